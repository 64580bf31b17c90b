// Command oracle replays, with Go's standard library only, what istiod does with a plugged-in CA directory
// (ROOT_CA_DIR) at startup and on reload, and what pilot-agent does with file-mounted gateway certificates.
//
// It was written from reading istio/istio 86c9f01 (go.mod: go 1.26.0); every step names the upstream file and
// function it transcribes. Only the Go calls istiod makes are repeated here, in istiod's order, so that the
// verdict and the error text are what istiod itself would produce. Nothing of istio is imported or copied.
//
// Input (stdin): a JSON array of {"dir": "...", "kind": "istio-ca"|"tls", "ca_signs_cert": bool}.
// Output (stdout): a JSON array, one object per input, in order:
//
//	istio-ca: {"dir", "kind", "startup": verdict, "reload": verdict}
//	tls:      {"dir", "kind", "gateway": verdict}
//
// verdict = {"ok": bool, "step": "<upstream function that failed>", "error": "<Go error text>",
// "after": "<error logged after a reload already took effect>"}.
//
// Reload path, for root rotations: `oracle -path reload -current-root FILE -rule 1.29|1.30 [-multiroot] DIR`
// replays istiod's handleEvent on DIR while istiod holds the root bytes of FILE (what it loaded at start or at
// its last accepted reload), and prints {"dir", "kind", "rule", "multiroot", "root_changed", "reload": verdict}.
// A changed root-cert.pem is taken only with -multiroot (ISTIO_MULTIROOT_MESH=true) and only when one root set
// contains the other: up to 1.29 as bytes (bytes.Contains either way), from 1.30.0 as sets of DER certificates
// (istio/istio 046d9df, #59909). Read at tags 1.29.6 and 1.30.3, pilot/pkg/bootstrap/istio_ca.go handleEvent.
package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// File names: security/pkg/pki/ca/ca.go (CACertFile, CAPrivateKeyFile, CACRLFile, CertChainFile,
// RootCertFile, TLSSecret*File).
const (
	caCertFile     = "ca-cert.pem"
	caKeyFile      = "ca-key.pem"
	caCRLFile      = "ca-crl.pem"
	certChainFile  = "cert-chain.pem"
	rootCertFile   = "root-cert.pem"
	tlsCertFile    = "tls.crt"
	tlsKeyFile     = "tls.key"
	tlsRootFile    = "ca.crt"
	istioGenerated = "istio-generated"
)

// Defaults istiod runs with unless overridden (pilot/pkg/bootstrap/istio_ca.go env.Register calls,
// security/pkg/cmd/constants.go, pilot/pkg/features/pilot.go).
const (
	defaultWorkloadCertTTL = 24 * time.Hour            // DEFAULT_WORKLOAD_CERT_TTL
	selfSignedCACertTTL    = 3650 * 24 * time.Hour     // CITADEL_SELF_SIGNED_CA_CERT_TTL, used by GenKeyCert
	enableCACRL            = true                      // PILOT_ENABLE_CA_CRL
	clockSkewGracePeriod   = 2 * time.Minute           // security/pkg/pki/util/generate_cert.go
	istiodDNSName          = "istiod.istio-system.svc" // getDNSNames: the first name istiod signs for itself
)

type request struct {
	Dir         string `json:"dir"`
	Kind        string `json:"kind"`
	CASignsCert bool   `json:"ca_signs_cert"`
}

type verdict struct {
	OK    bool   `json:"ok"`
	Step  string `json:"step,omitempty"`
	Error string `json:"error,omitempty"`
	After string `json:"after,omitempty"`
}

type result struct {
	Dir     string   `json:"dir"`
	Kind    string   `json:"kind"`
	Startup *verdict `json:"startup,omitempty"`
	Reload  *verdict `json:"reload,omitempty"`
	Serving *verdict `json:"serving,omitempty"`
	Gateway *verdict `json:"gateway,omitempty"`
}

func fail(step string, err error) verdict { return verdict{Step: step, Error: err.Error()} }

func main() {
	mode := flag.String("path", "", `"reload": replay istiod's reload of one directory (see the package comment)`)
	currentRoot := flag.String("current-root", "", "reload: the root-cert.pem bytes istiod had loaded, in a file")
	rule := flag.String("rule", "1.30", "reload: the root-set rule of istiod 1.29 (bytes) or 1.30 (DER sets)")
	multiRoot := flag.Bool("multiroot", false, "reload: ISTIO_MULTIROOT_MESH=true")
	flag.Parse()
	if *mode == "reload" {
		os.Exit(reloadMain(*currentRoot, *rule, *multiRoot, flag.Args()))
	}
	if *mode != "" {
		fmt.Fprintln(os.Stderr, "oracle: -path takes only reload")
		os.Exit(2)
	}
	var reqs []request
	if err := json.NewDecoder(os.Stdin).Decode(&reqs); err != nil {
		fmt.Fprintln(os.Stderr, "oracle: reading requests:", err)
		os.Exit(2)
	}
	results := make([]result, len(reqs))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for i, r := range reqs {
		wg.Add(1)
		go func(i int, r request) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			res := result{Dir: r.Dir, Kind: r.Kind}
			// istiod and pilot-agent do not recover: a panic (GODEBUG=fips140=only panics on SHA-1, e.g. checking a
			// SHA-1 CRL) ends their start, so it is the verdict of every path not yet taken
			defer func() {
				if e := recover(); e != nil {
					v := verdict{Step: "panic", Error: fmt.Sprint(e)}
					if r.Kind == "istio-ca" {
						res.Startup, res.Reload, res.Serving = &v, &v, nil
					} else {
						res.Gateway = &v
					}
					results[i] = res
				}
			}()
			switch r.Kind {
			case "istio-ca":
				s, sv := istiodStartup(r.Dir)
				rl := istiodReload(r.Dir)
				res.Startup, res.Reload, res.Serving = &s, &rl, sv
			case "tls":
				g := gateway(r.Dir, r.CASignsCert)
				res.Gateway = &g
			default:
				g := verdict{Step: "oracle", Error: "unknown kind " + r.Kind}
				res.Gateway = &g
			}
			results[i] = res
		}(i, r)
	}
	wg.Wait()
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "oracle:", err)
		os.Exit(2)
	}
}

// ---------------------------------------------------------------------------------------------------------
// istiod, pilot/pkg/bootstrap/istio_ca.go

type signingCAFileBundle struct { // security/pkg/pki/ca/ca.go SigningCAFileBundle
	RootCertFile    string
	CertChainFiles  []string
	SigningCertFile string
	SigningKeyFile  string
	CRLFile         string
}

// detectSigningCABundleAndCRL: tls.crt present means the kubernetes.io/tls layout, else the istiod layout,
// plus ca-crl.pem when it exists and PILOT_ENABLE_CA_CRL is on.
func detectSigningCABundleAndCRL(dir string) (signingCAFileBundle, error) {
	tlsSigningFile := filepath.Join(dir, tlsCertFile)
	if _, err := os.Stat(tlsSigningFile); err == nil {
		return signingCAFileBundle{
			RootCertFile:    filepath.Join(dir, tlsRootFile),
			CertChainFiles:  []string{tlsSigningFile, filepath.Join(dir, tlsRootFile)},
			SigningCertFile: tlsSigningFile,
			SigningKeyFile:  filepath.Join(dir, tlsKeyFile),
		}, nil
	} else if !os.IsNotExist(err) {
		return signingCAFileBundle{}, err
	}
	fb := signingCAFileBundle{
		RootCertFile:    filepath.Join(dir, rootCertFile),
		CertChainFiles:  []string{filepath.Join(dir, certChainFile)},
		SigningCertFile: filepath.Join(dir, caCertFile),
		SigningKeyFile:  filepath.Join(dir, caKeyFile),
	}
	if enableCACRL {
		crl := filepath.Join(dir, caCRLFile)
		if _, err := os.Stat(crl); err == nil {
			fb.CRLFile = crl
		}
	}
	return fb, nil
}

// fileExists and hasValidChainFiles, then checkCABundleCompleteness: which of the files exist.
func fileExists(name string) (bool, error) {
	if name == "" {
		return false, nil
	}
	if _, err := os.Stat(name); err != nil {
		if os.IsNotExist(err) {
			return false, nil
		}
		return false, fmt.Errorf("error checking file %s: %v", name, err)
	}
	return true, nil
}

func checkCABundleCompleteness(fb signingCAFileBundle) (complete, exists bool, err error) {
	key, err := fileExists(fb.SigningKeyFile)
	if err != nil {
		return false, false, err
	}
	cert, err := fileExists(fb.SigningCertFile)
	if err != nil {
		return false, key, err
	}
	root, err := fileExists(fb.RootCertFile)
	if err != nil {
		return false, key || cert, err
	}
	chain := false
	for _, f := range fb.CertChainFiles {
		ok, err := fileExists(f)
		if err != nil {
			return false, key || cert || root, err
		}
		if ok {
			chain = true
			break
		}
	}
	return key && cert && root && chain, key || cert || root || chain, nil
}

// istiodStartup follows createIstioCA for a complete plugged-in bundle: NewPluggedCertIstioCAOptions
// (security/pkg/pki/ca/ca.go), the CRL read, NewIstioCA's minTTL, then initDNSCertsIstiod's GenKeyCert
// (pilot/pkg/bootstrap/certcontroller.go), whose failure also stops istiod.
func istiodStartup(dir string) (verdict, *verdict) {
	v, bundle, der := istiodStart(dir)
	if !v.OK {
		return v, nil
	}
	s := servingVerify(bundle, der)
	return v, &s
}

// servingVerify: how pilot-agent checks the serving certificate istiod just made for itself when it dials istiod
// for config and certificates. pilot/pkg/grpc/tls.go getTLSDialOption: crypto/tls with RootCAs from the root cert
// istiod publishes (root-cert.pem) and ServerName istiod.istio-system.svc; the server sends its certificate and
// then cert-chain.pem (security/pkg/pki/ca/ca.go signWithCertChain appends GetCertChainPem).
func servingVerify(b *keyCertBundle, der []byte) verdict {
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return fail("pilot-agent dial istiod", err)
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AppendCertsFromPEM(b.rootCertBytes)
	inters.AppendCertsFromPEM(b.certChainBytes)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, DNSName: istiodDNSName}); err != nil {
		return fail("pilot-agent dial istiod", err)
	}
	return verdict{OK: true}
}

func istiodStart(dir string) (verdict, *keyCertBundle, []byte) {
	fb, err := detectSigningCABundleAndCRL(dir)
	if err != nil {
		return fail("detectSigningCABundleAndCRL", fmt.Errorf("unable to determine signing file format %v", err)), nil, nil
	}
	complete, exists, err := checkCABundleCompleteness(fb)
	if err != nil {
		return fail("checkCABundleCompleteness", fmt.Errorf("failed to create an istiod CA: %w", err)), nil, nil
	}
	if !complete && exists {
		return fail("checkCABundleCompleteness",
			errors.New("failed to create an istiod CA: incomplete signing CA bundle detected")), nil, nil
	}
	if !complete {
		return fail("createIstioCA", errors.New("no plugged-in CA files: istiod would use a self-signed CA")), nil, nil
	}
	// The istio-generated marker only matters with USE_CACERTS_FOR_SELF_SIGNED_CA (default false).

	// security/pkg/pki/ca/ca.go NewPluggedCertIstioCAOptions
	bundle, err := newVerifiedKeyCertBundleFromFile(fb)
	if err != nil {
		return fail("NewVerifiedKeyCertBundleFromFile",
			fmt.Errorf("failed to create an istiod CA: failed to create CA KeyCertBundle (%v)", err)), nil, nil
	}
	b, err := os.ReadFile(fb.SigningCertFile)
	if err != nil {
		return fail("NewPluggedCertIstioCAOptions", fmt.Errorf("failed to create an istiod CA: %v", err)), nil, nil
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return fail("NewPluggedCertIstioCAOptions",
			errors.New("failed to create an istiod CA: invalid PEM encoded certificate")), nil, nil
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fail("NewPluggedCertIstioCAOptions",
			errors.New("failed to create an istiod CA: failed to parse X.509 certificate")), nil, nil
	}
	if !cert.IsCA {
		return fail("NewPluggedCertIstioCAOptions",
			errors.New("failed to create an istiod CA: certificate is not authorized to sign other certificates")), nil, nil
	}

	// createIstioCA: with a CRL file, it is read again for the initial replication.
	if fb.CRLFile != "" {
		if _, err := os.ReadFile(fb.CRLFile); err != nil {
			return fail("createIstioCA", err), nil, nil
		}
	}

	// security/pkg/pki/ca/ca.go NewIstioCA -> minTTL, which reads the first block of cert-chain.pem.
	if _, err := minTTL(bundle, defaultWorkloadCertTTL); err != nil {
		return fail("NewIstioCA.minTTL", fmt.Errorf("failed to create an istiod CA: failed to get default cert TTL %s", err)), nil, nil
	}

	// pilot/pkg/bootstrap/certcontroller.go initDNSCertsIstiod -> IstioCA.GenKeyCert
	der, err := genKeyCert(bundle)
	if err != nil {
		return fail("initDNSCertsIstiod.GenKeyCert", fmt.Errorf("failed generating istiod key cert %v", err)), nil, nil
	}
	return verdict{OK: true}, bundle, der
}

// istiodReload follows handleEvent for a reload that keeps root-cert.pem byte-identical (the agent compares
// roots itself): UpdateVerifiedKeyCertBundleFromFile, then updateRootCertAndGenKeyCert, which runs after the
// new bundle is already in use, so its failure is only logged ("after").
func istiodReload(dir string) verdict {
	fb, err := detectSigningCABundleAndCRL(dir)
	if err != nil {
		return fail("handleEvent", fmt.Errorf("unable to determine signing file format %v", err))
	}
	if _, err := os.ReadFile(fb.RootCertFile); err != nil {
		return fail("handleEvent", fmt.Errorf("failed reading root-cert.pem: %v", err))
	}
	// The CRL is read once more to decide whether to replicate it; a read error is only logged there.
	bundle, err := newVerifiedKeyCertBundleFromFile(fb) // UpdateVerifiedKeyCertBundleFromFile reads the same way
	if err != nil {
		return fail("UpdateVerifiedKeyCertBundleFromFile", fmt.Errorf("Failed to update new Plug-in CA certs: %v", err))
	}
	v := verdict{OK: true}
	if _, err := genKeyCert(bundle); err != nil {
		v.After = fmt.Sprintf("Failed generating plugged-in istiod key cert: %v", err)
	}
	return v
}

// reloadResult is what `-path reload` prints.
type reloadResult struct {
	Dir         string  `json:"dir"`
	Kind        string  `json:"kind"`
	Rule        string  `json:"rule"`
	MultiRoot   bool    `json:"multiroot"`
	RootChanged bool    `json:"root_changed"`
	Reload      verdict `json:"reload"`
}

func reloadMain(currentRoot, rule string, multiRoot bool, dirs []string) int {
	if len(dirs) != 1 || currentRoot == "" || (rule != "1.29" && rule != "1.30") {
		fmt.Fprintln(os.Stderr, "usage: oracle -path reload -current-root FILE -rule 1.29|1.30 [-multiroot] DIR")
		return 2
	}
	current, err := os.ReadFile(currentRoot)
	if err != nil {
		fmt.Fprintln(os.Stderr, "oracle:", err)
		return 2
	}
	changed, v := istiodReloadFrom(dirs[0], current, rule, multiRoot)
	out := reloadResult{Dir: dirs[0], Kind: "istio-ca", Rule: rule, MultiRoot: multiRoot, RootChanged: changed, Reload: v}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "oracle:", err)
		return 2
	}
	return 0
}

// istiodReloadFrom follows handleEvent when istiod holds `current` as its root (KeyCertBundle.GetRootCertPem: the
// bytes of root-cert.pem as last read, unchanged): a changed root-cert.pem needs MultiRootMesh and nested root
// sets, then the bundle is verified as at start (UpdateVerifiedKeyCertBundleFromFile) and istiod's own
// certificate made anew (updateRootCertAndGenKeyCert, only logged when it fails). Returns whether the root changed.
func istiodReloadFrom(dir string, current []byte, rule string, multiRoot bool) (bool, verdict) {
	fb, err := detectSigningCABundleAndCRL(dir)
	if err != nil {
		return false, fail("handleEvent", fmt.Errorf("unable to determine signing file format %v", err))
	}
	newCABundle, err := os.ReadFile(fb.RootCertFile)
	if err != nil {
		return false, fail("handleEvent", fmt.Errorf("failed reading root-cert.pem: %v", err))
	}
	changed := !bytes.Equal(current, newCABundle)
	if changed {
		if !multiRoot {
			return true, fail("handleEvent", errors.New("Multi root is disabled, updating new ROOT-CA not supported"))
		}
		var nested bool
		if rule == "1.29" {
			// 1.29.6: in order to support root ca rotation, or we are removing the old ca, ...
			nested = bytes.Contains(current, newCABundle) || bytes.Contains(newCABundle, current)
		} else {
			nested = pemBundleHasSubsetRelation(current, newCABundle)
		}
		if !nested {
			return true, fail("handleEvent", errors.New("Updating new ROOT-CA not supported"))
		}
	}
	return changed, istiodReload(dir)
}

// pemBundleHasSubsetRelation (1.30.0+): one set of DER certificates contains the other; an empty set never does.
func pemBundleHasSubsetRelation(a, b []byte) bool {
	certsA, certsB := pemToRawCertSet(a), pemToRawCertSet(b)
	if len(certsA) == 0 || len(certsB) == 0 {
		return false
	}
	return supersetOf(certsA, certsB) || supersetOf(certsB, certsA)
}

// pemToRawCertSet: the DER bytes of every "CERTIFICATE" block (other block types are ignored).
func pemToRawCertSet(pemData []byte) map[string]struct{} {
	certs := map[string]struct{}{}
	for {
		var block *pem.Block
		block, pemData = pem.Decode(pemData)
		if block == nil {
			break
		}
		if block.Type == "CERTIFICATE" {
			certs[string(block.Bytes)] = struct{}{}
		}
	}
	return certs
}

func supersetOf(a, b map[string]struct{}) bool {
	for k := range b {
		if _, ok := a[k]; !ok {
			return false
		}
	}
	return true
}

// ---------------------------------------------------------------------------------------------------------
// security/pkg/pki/util/keycertbundle.go

type keyCertBundle struct {
	certBytes, privKeyBytes, certChainBytes, rootCertBytes, crlBytes []byte
	cert                                                             *x509.Certificate // setAllFromPem
	privKey                                                          crypto.PrivateKey
}

// NewVerifiedKeyCertBundleFromFile: read the files (chain files concatenated), the optional CRL, then Verify;
// setAllFromPem keeps ParsePemEncodedCertificate/ParsePemEncodedKey results, ignoring their errors.
func newVerifiedKeyCertBundleFromFile(fb signingCAFileBundle) (*keyCertBundle, error) {
	certBytes, err := os.ReadFile(fb.SigningCertFile)
	if err != nil {
		return nil, err
	}
	privKeyBytes, err := os.ReadFile(fb.SigningKeyFile)
	if err != nil {
		return nil, err
	}
	var chain []byte
	for _, f := range fb.CertChainFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		chain = append(chain, b...)
	}
	rootBytes, err := os.ReadFile(fb.RootCertFile)
	if err != nil {
		return nil, err
	}
	var crl []byte // gerCRLBytesFromFile
	if fb.CRLFile != "" {
		if crl, err = os.ReadFile(fb.CRLFile); err != nil {
			return nil, err
		}
	}
	if err := verify(certBytes, privKeyBytes, chain, rootBytes, crl); err != nil {
		return nil, err
	}
	b := &keyCertBundle{certBytes: certBytes, privKeyBytes: privKeyBytes, certChainBytes: chain,
		rootCertBytes: rootBytes, crlBytes: crl}
	b.cert, _ = parsePemEncodedCertificate(certBytes)
	b.privKey, _ = parsePemEncodedKey(privKeyBytes)
	return b, nil
}

// Verify: x509 pools from root-cert.pem and cert-chain.pem, Verify with Go's defaults (now, ServerAuth),
// ParsePemEncodedKey, tls.X509KeyPair, then (with a CRL) a CRL signed by every certificate of cert-chain.pem.
func verify(certBytes, privKeyBytes, certChainBytes, rootCertBytes, crl []byte) error {
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootCertBytes)
	inters := x509.NewCertPool()
	inters.AppendCertsFromPEM(certChainBytes)
	cert, err := parsePemEncodedCertificate(certBytes)
	if err != nil {
		return fmt.Errorf("failed to parse cert PEM: %v", err)
	}
	chains, err := cert.Verify(x509.VerifyOptions{Intermediates: inters, Roots: roots})
	if len(chains) == 0 || err != nil {
		return fmt.Errorf("cannot verify the cert with the provided root chain and cert pool with error: %v", err)
	}
	if _, err := parsePemEncodedKey(privKeyBytes); err != nil {
		return fmt.Errorf("failed to parse private key PEM: %v", err)
	}
	if _, err := tls.X509KeyPair(certBytes, privKeyBytes); err != nil {
		return fmt.Errorf("the cert does not match the key: %v", err)
	}
	if len(crl) == 0 {
		return nil
	}
	// Every PEM block of cert-chain.pem is parsed as a certificate (no type check) and needs a CRL it signed.
	var signers []*x509.Certificate
	for rest := certChainBytes; ; {
		block, remaining := pem.Decode(rest)
		if block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return fmt.Errorf("failed to parse cert chain: %w", err)
		}
		signers = append(signers, c)
		rest = remaining
	}
	var crls []*x509.RevocationList
	for rest := crl; ; {
		block, remaining := pem.Decode(rest)
		if block == nil {
			break
		}
		rl, err := x509.ParseRevocationList(block.Bytes)
		if err != nil {
			return fmt.Errorf("failed to parse CRL PEM: %w", err)
		}
		crls = append(crls, rl)
		rest = remaining
	}
	// Keyed by Subject.String(), so certificates with the same subject string share one entry (the last wins).
	missing := make(map[string]*x509.Certificate, len(signers))
	for _, s := range signers {
		missing[s.Subject.String()] = s
	}
	for _, rl := range crls {
		for subj, s := range missing {
			if rl.CheckSignatureFrom(s) == nil {
				delete(missing, subj)
			}
		}
		if len(missing) == 0 {
			break
		}
	}
	if len(missing) != 0 {
		names := make([]string, 0, len(missing))
		for subj := range missing {
			names = append(names, subj)
		}
		return fmt.Errorf("missing CRL signed by certificates: %v", names)
	}
	return nil
}

// minTTL (security/pkg/pki/ca/ca.go) with TimeBeforeCertExpires/extractCertExpiryTimestamp (keycertbundle.go).
func minTTL(b *keyCertBundle, defaultCertTTL time.Duration) (time.Duration, error) {
	if len(b.certChainBytes) == 0 {
		return defaultCertTTL, nil
	}
	c, err := parsePemEncodedCertificate(b.certChainBytes)
	if err != nil {
		return 0, fmt.Errorf("failed to get cert chain TTL %s",
			fmt.Errorf("failed to extract cert expiration timestamp: %v", fmt.Errorf("failed to parse the cert: %v", err)))
	}
	left := time.Until(c.NotAfter)
	if left <= 0 {
		return 0, errors.New("cert chain has expired")
	}
	return min(defaultCertTTL, left), nil
}

// ---------------------------------------------------------------------------------------------------------
// security/pkg/pki/util/crypto.go

// ParsePemEncodedCertificate: the first PEM block, whatever its type.
func parsePemEncodedCertificate(certBytes []byte) (*x509.Certificate, error) {
	cb, _ := pem.Decode(certBytes)
	if cb == nil {
		return nil, errors.New("invalid PEM encoded certificate")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, errors.New("failed to parse X.509 certificate")
	}
	return cert, nil
}

// ParsePemEncodedKey: the first PEM block; its label picks exactly one parser.
func parsePemEncodedKey(keyBytes []byte) (crypto.PrivateKey, error) {
	kb, _ := pem.Decode(keyBytes)
	if kb == nil {
		return nil, errors.New("invalid PEM-encoded key")
	}
	switch kb.Type {
	case "EC PRIVATE KEY":
		key, err := x509.ParseECPrivateKey(kb.Bytes)
		if err != nil {
			return nil, fmt.Errorf("failed to parse the ECDSA private key: %v", err)
		}
		return key, nil
	case "RSA PRIVATE KEY":
		key, err := x509.ParsePKCS1PrivateKey(kb.Bytes)
		if err != nil {
			return nil, fmt.Errorf("failed to parse the RSA private key: %v", err)
		}
		return key, nil
	case "PRIVATE KEY":
		key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
		if err != nil {
			return nil, fmt.Errorf("failed to parse the PKCS8 private key: %v", err)
		}
		return key, nil
	default:
		return nil, fmt.Errorf("unsupported PEM block type for a private key: %s", kb.Type)
	}
}

// ParseRootCerts: TrimSpace, then every PEM block parsed as a certificate; bad ones are skipped, and a
// PEM decoding failure ends the loop.
func parseRootCerts(certBytes []byte) ([]byte, []error) {
	var valid []byte
	var errs []error
	certBytes = bytes.TrimSpace(certBytes)
	for len(certBytes) > 0 {
		var cb *pem.Block
		cb, certBytes = pem.Decode(certBytes)
		if cb == nil {
			errs = append(errs, errors.New("invalid PEM encoded certificate"))
			return valid, errs
		}
		if _, err := x509.ParseCertificate(cb.Bytes); err != nil {
			errs = append(errs, err)
			continue
		}
		valid = append(valid, pem.EncodeToMemory(cb)...)
	}
	return valid, errs
}

// ---------------------------------------------------------------------------------------------------------
// IstioCA.GenKeyCert (security/pkg/pki/ca/ca.go): a CSR with a key like the CA's (util.GetEllipticCurve,
// util.GenCSR), signed by sign() -> util.GenCertFromCSR -> genCertTemplateFromCSR -> x509.CreateCertificate.

var (
	csrKeyOnce sync.Once
	csrKeys    map[string]crypto.Signer // the CSR's own key does not change the outcome: generate each kind once
)

func csrKey(kind string) crypto.Signer {
	csrKeyOnce.Do(func() {
		p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		r, _ := rsa.GenerateKey(rand.Reader, 2048) // CertOptions.RSAKeySize = rsaKeySize (2048)
		csrKeys = map[string]crypto.Signer{"p256": p256, "p384": p384, "rsa": r}
	})
	return csrKeys[kind]
}

func genKeyCert(b *keyCertBundle) ([]byte, error) {
	signingCert, signingKey := b.cert, b.privKey
	if signingCert == nil {
		return nil, errors.New("Istio CA is not ready") // sign(): CANotReady
	}
	kind := "rsa"
	if k, ok := signingKey.(*ecdsa.PrivateKey); ok { // util.GetEllipticCurve: P384, else P256
		kind = "p256"
		if k.Curve == elliptic.P384() {
			kind = "p384"
		}
	}
	priv := csrKey(kind)
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{Organization: []string{""}}, DNSNames: []string{istiodDNSName},
	}, priv)
	if err != nil {
		return nil, fmt.Errorf("CSR creation failed (%v)", err)
	}
	csr, err := x509.ParseCertificateRequest(csrDER) // util.ParsePemEncodedCSR
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	// genCertTemplateFromCSR
	now := time.Now()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128)) // genSerialNum
	if err != nil {
		return nil, err
	}
	if !now.Before(signingCert.NotAfter) {
		return nil, fmt.Errorf("signing certificate has expired at %v", signingCert.NotAfter)
	}
	notAfter := now.Add(selfSignedCACertTTL)
	if !notAfter.Before(signingCert.NotAfter) {
		notAfter = signingCert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-clockSkewGracePeriod),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{istiodDNSName}, // BuildSubjectAltNameExtension(hosts)
	}
	return x509.CreateCertificate(rand.Reader, tmpl, signingCert, csr.PublicKey, signingKey)
}

// ---------------------------------------------------------------------------------------------------------
// pilot-agent with file-mounted gateway certificates: security/pkg/nodeagent/cache/secretcache.go

// gateway: generateKeyCertFromExistingFiles (tls.LoadX509KeyPair), keyCertSecretItem
// (security/pkg/nodeagent/util ParseCertAndGetExpiryTimestamp), generateRootCertFromExistingFile
// (ParseRootCerts, at least one valid root) for ca.crt. With ca_signs_cert the agent also asks that tls.crt
// verifies to ca.crt (x509 defaults), which is the agent's own rule, not pilot-agent's.
func gateway(dir string, caSignsCert bool) verdict {
	certPath, keyPath, caPath := filepath.Join(dir, tlsCertFile), filepath.Join(dir, tlsKeyFile), filepath.Join(dir, tlsRootFile)
	if _, err := tls.LoadX509KeyPair(certPath, keyPath); err != nil {
		return fail("generateKeyCertFromExistingFiles", err)
	}
	chain, err := os.ReadFile(certPath)
	if err != nil {
		return fail("keyCertSecretItem", err)
	}
	block, _ := pem.Decode(chain)
	if block == nil {
		return fail("ParseCertAndGetExpiryTimestamp", errors.New("failed to decode certificate"))
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return fail("ParseCertAndGetExpiryTimestamp", fmt.Errorf("failed to parse certificate: %v", err))
	}
	caBytes, err := os.ReadFile(caPath)
	if os.IsNotExist(err) || (err == nil && len(bytes.TrimSpace(caBytes)) == 0) {
		return verdict{OK: true} // no caCertificates for this server
	}
	if err != nil {
		return fail("generateRootCertFromExistingFile", err)
	}
	valid, errs := parseRootCerts(caBytes)
	if len(valid) == 0 {
		return fail("generateRootCertFromExistingFile",
			fmt.Errorf("failed to parse root certs from file %s: %v", caPath, errs))
	}
	if !caSignsCert {
		return verdict{OK: true}
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fail("ca_signs_cert", err)
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AppendCertsFromPEM(valid)
	inters.AppendCertsFromPEM(chain)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters}); err != nil {
		return fail("ca_signs_cert", err)
	}
	return verdict{OK: true}
}
