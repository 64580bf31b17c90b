"""Side-by-side benchmark of istio-vault-agent against `bao agent`; run it with `python -m bench [--quick]`."""
