{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "istio-vault-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of every object: the release name when it already names the chart, so the
common `helm install istio-vault-agent ...` gives a ConfigMap called istio-vault-agent,
which is what the example values mount.
*/}}
{{- define "istio-vault-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "istio-vault-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "istio-vault-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Every service account that runs the agent: serviceAccountName, then extraServiceAccountNames.
*/}}
{{- define "istio-vault-agent.serviceAccounts" -}}
{{- $all := list (required "serviceAccountName is required" .Values.serviceAccountName) }}
{{- range .Values.extraServiceAccountNames }}
{{- $all = append $all . }}
{{- end }}
{{- join "," (uniq $all) }}
{{- end }}

{{/*
Where the agent container sees the ConfigMap; the example values mount it here.
*/}}
{{- define "istio-vault-agent.configDir" -}}
/etc/istio-vault-agent
{{- end }}

{{/*
The bundles for the selected mode, each with its type filled in, as a YAML list.
Every bundle needs name, one source variant (kv, pki_intermediate or pki) and dir (a
remote-secret bundle: cluster instead of dir); a missing one fails the render with the
values key to set.
*/}}
{{- define "istio-vault-agent.bundles" -}}
{{- $bundles := list }}
{{- if eq .Values.mode "istiod" }}
{{- $b := deepCopy (required "istiod.bundle is required when mode is istiod" .Values.istiod.bundle) }}
{{- $_ := set $b "type" "istio-ca" }}
{{- $bundles = append $bundles $b }}
{{- else if eq .Values.mode "gateway" }}
{{- if not .Values.gateway.bundles }}
{{- fail "gateway.bundles must list at least one tls bundle when mode is gateway" }}
{{- end }}
{{- range .Values.gateway.bundles }}
{{- $b := deepCopy . }}
{{- if not (hasKey $b "type") }}
{{- $_ := set $b "type" "tls" }}
{{- end }}
{{- $bundles = append $bundles $b }}
{{- end }}
{{- else }}
{{- fail (printf "mode must be istiod or gateway, not %q" (toString .Values.mode)) }}
{{- end }}
{{- range .Values.extraBundles }}
{{- $bundles = append $bundles (deepCopy .) }}
{{- end }}
{{- if .Values.openshift }}
{{- range $bundles }}
{{- if not (or (hasKey . "key_mode") (eq (toString .type) "remote-secret")) }}
{{- /* 0640 (416 decimal): the reader runs with another uid and gets the key through the pod's fsGroup; a
remote-secret bundle (a Secret, no files) has no key_mode */}}
{{- $_ := set . "key_mode" 416 }}
{{- end }}
{{- end }}
{{- end }}
{{- range (.Values.remoteSecrets).bundles }}
{{- $b := deepCopy . }}
{{- $_ := set $b "type" "remote-secret" }}
{{- if eq (toString $b.target) "files" }}
{{- /* target files (istiod 1.30+): the set goes into the kubeconfig directory istiod reads, not a Secret */}}
{{- if not $b.dir }}
{{- $_ := set $b "dir" $.Values.remoteSecrets.filesDir }}
{{- end }}
{{- if and $.Values.openshift (not (hasKey $b "key_mode")) }}
{{- $_ := set $b "key_mode" 416 }}
{{- end }}
{{- else if not $b.namespace }}
{{- $_ := set $b "namespace" $.Release.Namespace }}
{{- end }}
{{- $bundles = append $bundles $b }}
{{- end }}
{{- range $i, $b := $bundles }}
{{- $where := printf "bundle %d (%s)" $i (toString ($b.name | default "unnamed")) }}
{{- if not $b.name }}
{{- fail (printf "%s needs a name" $where) }}
{{- end }}
{{- $variants := 0 }}
{{- if and $b.source (kindIs "map" $b.source) }}
{{- range $key := list "kv" "pki_intermediate" "pki" }}
{{- if index $b.source $key }}
{{- $variants = add1 $variants }}
{{- end }}
{{- end }}
{{- end }}
{{- if ne (int $variants) 1 }}
{{- fail (printf "%s needs exactly one of source.kv (<kv mount>/<path>), source.pki_intermediate or source.pki (set the others to null)" $where) }}
{{- end }}
{{- if eq (toString $b.type) "remote-secret" }}
{{- if and (not $b.cluster) (ne (toString $b.target) "files") }}
{{- fail (printf "%s needs cluster (the remote cluster's name, the key of its kubeconfig in KV)" $where) }}
{{- end }}
{{- else if not $b.dir }}
{{- fail (printf "%s needs dir (a path on the volume shared with istiod or istio-proxy)" $where) }}
{{- end }}
{{- end }}
{{- toYaml $bundles }}
{{- end }}

{{/*
The agent configuration file (issue 2 contract), built as a dict and serialised with
toYaml so values never need YAML quoting by hand.
*/}}
{{- define "istio-vault-agent.config" -}}
{{- $vault := dict "address" (required "vault.address is required (the Vault or OpenBao URL seen from the pod)" .Values.vault.address) }}
{{- if .Values.vault.caCertPEM }}
{{- $_ := set $vault "ca_cert" (printf "%s/vault-ca.crt" (include "istio-vault-agent.configDir" .)) }}
{{- else if .Values.vault.caCertPath }}
{{- $_ := set $vault "ca_cert" .Values.vault.caCertPath }}
{{- end }}
{{- with .Values.vault.namespace }}
{{- $_ := set $vault "namespace" . }}
{{- end }}
{{- with .Values.vault.tlsServerName }}
{{- $_ := set $vault "tls_server_name" . }}
{{- end }}
{{- $auth := dict
  "method" .Values.auth.method
  "mount" (required "auth.mount is required (the Vault auth mount for this cluster)" .Values.auth.mount)
  "role" (required "auth.role is required (the Vault role bound to the pod's service account)" .Values.auth.role)
  "token_path" .Values.auth.tokenPath }}
{{- $config := dict
  "vault" $vault
  "auth" $auth
  "bundles" (include "istio-vault-agent.bundles" . | fromYamlArray)
  "init" (dict "timeout" .Values.init.timeout)
  "health" (dict "listen" .Values.health.listen)
  "sidecar" (dict "poll_interval" .Values.sidecar.pollInterval) }}
{{- $istio := include "istio-vault-agent.istio" . | fromYaml }}
{{- if $istio }}
{{- $_ := set $config "istio" $istio }}
{{- end }}
{{- $config = mustMergeOverwrite $config (deepCopy (.Values.extraConfig | default dict)) }}
{{- toYaml $config }}
{{- end }}

{{/*
The agent's `istio:` section (docs/istio-versions.md), only the keys that are set. istio.version defaults to
global.tag when that is a release tag (1.29.6, 1.29.6-distroless): this chart does not see the image of the
istiod release it sits beside, so the tag is known only when the same values (global.tag) are given to both.
*/}}
{{- define "istio-vault-agent.istio" -}}
{{- $values := .Values.istio | default dict }}
{{- $out := dict }}
{{- $version := $values.version }}
{{- if or (kindIs "float64" $version) (kindIs "int64" $version) (kindIs "int" $version) }}
{{- fail (printf "istio.version must be quoted, such as \"1.30.3\": YAML reads the unquoted %v as a number, in which 1.30 is 1.3" $version) }}
{{- end }}
{{- $version = toString ($version | default "") }}
{{- $form := "^v?1[.](0|[1-9][0-9]{0,2})([.](0|[1-9][0-9]{0,2}))?$" }}
{{- if and $version (not (regexMatch $form $version)) }}
{{- fail (printf "istio.version must be an Istio version such as 1.29 or 1.29.6 (MAJOR.MINOR[.PATCH]), not %q" $version) }}
{{- end }}
{{- if not $version }}
{{- $tag := toString ((.Values.global | default dict).tag | default "") }}
{{- $version = regexFind "^1[.][0-9]+([.][0-9]+)?" (trimPrefix "v" $tag) }}
{{- if not (regexMatch $form $version) }}
{{- $version = "" }}
{{- end }}
{{- end }}
{{- if $version }}
{{- $_ := set $out "version" $version }}
{{- end }}
{{- if $values.ambient }}
{{- $_ := set $out "ambient" true }}
{{- end }}
{{- with $values.compliancePolicy }}
{{- $_ := set $out "compliance_policy" . }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Name of the bootstrap Job (and of its ServiceAccount unless bootstrap.serviceAccountName is set).
*/}}
{{- define "istio-vault-agent.bootstrapName" -}}
{{- printf "%s-ca-bootstrap" (include "istio-vault-agent.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}

{{/*
Labels of the pods that run the agent (monitoring.podSelector, or what the istiod and
gateway charts put on their pods).
*/}}
{{- define "istio-vault-agent.podSelector" -}}
{{- if .Values.monitoring.podSelector }}
{{- toYaml .Values.monitoring.podSelector }}
{{- else if eq .Values.mode "gateway" -}}
app: {{ required "serviceAccountName (or monitoring.podSelector) is required to select the gateway pods" .Values.serviceAccountName }}
{{- else -}}
app: istiod
{{- end }}
{{- end }}

{{/*
Labels of the monitoring objects: the common ones plus monitoring.labels.
*/}}
{{- define "istio-vault-agent.monitoringLabels" -}}
{{ include "istio-vault-agent.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The `job` label the PodMonitor and the ServiceMonitor give the agent's series, so the
alerts find this release's agents whichever of the two scrapes them.
*/}}
{{- define "istio-vault-agent.job" -}}
{{ include "istio-vault-agent.fullname" . }}
{{- end }}

{{/*
The label matchers (without braces) that pick this release's series in the alerts.
*/}}
{{- define "istio-vault-agent.ruleSelector" -}}
{{- if .Values.monitoring.prometheusRule.selector }}
{{- .Values.monitoring.prometheusRule.selector | trim | trimPrefix "{" | trimSuffix "}" }}
{{- else }}
{{- printf "job=%q,namespace=%q" (include "istio-vault-agent.job" .) .Release.Namespace }}
{{- end }}
{{- end }}
