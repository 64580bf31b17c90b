// Which files istiod 1.30+ reads from PILOT_MULTICLUSTER_KUBECONFIG_PATH, replayed with Go's standard library.
//
// Transcribed from istio/istio 86c9f01 (and tag 1.30.3, where it is the same apart from the empty-file skip),
// pkg/kube/krt/files/files.go, FolderWatch.readOnce: filepath.Walk from the directory; an entry whose extension
// (filepath.Ext) is not ".yaml" or ".yml", or whose mode has any os.ModeType bit (a directory, a symlink, a
// device...), is skipped; every other one is read with os.ReadFile and parsed (the kubeconfig parse itself,
// clientcmd.Load in pkg/kube/multicluster/kubeconfig_files.go, needs client-go and is done by the Python test); the
// first error of the walk or of a read ends the whole read. Since 1.31 (#60026) an empty file is skipped; 1.30
// parses it as an empty kubeconfig, which has no cluster ID, so the read fails. Empty files are listed (size 0).
//
// Usage: oracle -path kubeconfig-dir DIR [N]
// Output: {"dir", "files": [{"path": "<relative to DIR>", "size": n, "sha256": hex}], "error": "<the walk's error>"};
// with N, a JSON array of N such reads made back to back (a reader racing a publisher).
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

type kubeconfigFile struct {
	Path   string `json:"path"`
	Size   int    `json:"size"`
	Sha256 string `json:"sha256"`
}

type kubeconfigDir struct {
	Dir   string           `json:"dir"`
	Files []kubeconfigFile `json:"files"`
	Error string           `json:"error,omitempty"`
}

func kubeconfigDirMain(args []string) int {
	if len(args) != 1 && len(args) != 2 {
		fmt.Fprintln(os.Stderr, "oracle: -path kubeconfig-dir takes one directory and an optional count")
		return 2
	}
	if len(args) == 1 {
		if err := json.NewEncoder(os.Stdout).Encode(readKubeconfigDir(args[0])); err != nil {
			return 2
		}
		return 0
	}
	n, err := strconv.Atoi(args[1])
	if err != nil || n < 1 {
		fmt.Fprintln(os.Stderr, "oracle: the count must be a positive number")
		return 2
	}
	reads := make([]kubeconfigDir, 0, n)
	for i := 0; i < n; i++ {
		reads = append(reads, readKubeconfigDir(args[0]))
	}
	if err := json.NewEncoder(os.Stdout).Encode(reads); err != nil {
		return 2
	}
	return 0
}

// readKubeconfigDir is one FolderWatch.readOnce, up to the parse.
func readKubeconfigDir(root string) kubeconfigDir {
	out := kubeconfigDir{Dir: root, Files: []kubeconfigFile{}}
	err := filepath.Walk(root, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		} else if ext := filepath.Ext(path); (ext != ".yaml" && ext != ".yml") || (info.Mode()&os.ModeType) != 0 {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		// an empty file is listed with size 0: 1.31+ skips it (#60026), 1.30 fails the read on it (the test decides)
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		out.Files = append(out.Files, kubeconfigFile{Path: rel, Size: len(data), Sha256: hex.EncodeToString(sum[:])})
		return nil
	})
	if err != nil {
		out.Error = err.Error()
	}
	return out
}
