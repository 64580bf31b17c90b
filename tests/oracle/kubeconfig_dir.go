// Which files istiod 1.30+ reads from PILOT_MULTICLUSTER_KUBECONFIG_PATH, replayed with Go's standard library.
//
// Transcribed from istio/istio 86c9f01 (and tag 1.30.3, where it is the same apart from the empty-file skip),
// pkg/kube/krt/files/files.go, FolderWatch.readOnce: filepath.Walk from the directory; an entry whose extension
// (filepath.Ext) is not ".yaml" or ".yml", or whose mode has any os.ModeType bit (a directory, a symlink, a
// device...), is skipped; every other one is read with os.ReadFile and parsed (the kubeconfig parse itself,
// clientcmd.Load in pkg/kube/multicluster/kubeconfig_files.go, needs client-go and is done by the Python test); the
// first error of the walk or of a read ends the whole read. Since 1.31 (#60026) an empty file is skipped.
//
// Usage: oracle -path kubeconfig-dir DIR
// Output: {"dir", "files": [{"path": "<relative to DIR>", "size": n}], "error": "<the walk's error, if any>"}.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

type kubeconfigFile struct {
	Path string `json:"path"`
	Size int    `json:"size"`
}

type kubeconfigDir struct {
	Dir   string           `json:"dir"`
	Files []kubeconfigFile `json:"files"`
	Error string           `json:"error,omitempty"`
}

func kubeconfigDirMain(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "oracle: -path kubeconfig-dir takes one directory")
		return 2
	}
	root := args[0]
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
		if len(data) == 0 {
			return nil
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		out.Files = append(out.Files, kubeconfigFile{Path: rel, Size: len(data)})
		return nil
	})
	if err != nil {
		out.Error = err.Error()
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		return 2
	}
	return 0
}
