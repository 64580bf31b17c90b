"""istio-vault-agent: Istio's CA from Vault or OpenBao, validated like istiod and published atomically."""

__version__ = "0.1.0"
