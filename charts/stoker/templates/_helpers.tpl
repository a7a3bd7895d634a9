{{/*
Names. Every object the chart creates is prefixed with the release's full name, so two
releases can live side by side in one namespace. The full name is the release name when it
already contains the chart name ("stoker" -> stoker-operator), else "<release>-stoker"
(ab -> ab-stoker-operator), cut to 63 characters as DNS labels require.
*/}}
{{- define "stoker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stoker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Component names: room is left for the suffix, so the result stays a valid DNS label. */}}
{{- define "stoker.operator.fullname" -}}
{{- printf "%s-operator" (include "stoker.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "stoker.agent.fullname" -}}
{{- printf "%s-agent" (include "stoker.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}

{{/* A component's metrics Service: include "stoker.metricsServiceName" (list . "agent") */}}
{{- define "stoker.metricsServiceName" -}}
{{- printf "%s-%s-metrics" (include "stoker.fullname" (index . 0) | trunc 46 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{- define "stoker.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "stoker.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "stoker.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "stoker.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's leader-election Lease: one per release, so two releases never share a leader. */}}
{{- define "stoker.operator.leaseName" -}}
{{- include "stoker.operator.fullname" . -}}
{{- end -}}

{{/* Metrics listen on all interfaces only where a Service scrapes them. */}}
{{- define "stoker.metricsAddr" -}}
{{- if .Values.metrics.enabled }}0.0.0.0{{ else }}127.0.0.1{{ end -}}
{{- end -}}

{{/* The image of one component: (dict "root" $ "image" .Values.<component>.image) */}}
{{- define "stoker.image" -}}
{{ .image.repository }}:{{ .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{- define "stoker.pullPolicy" -}}
{{ .image.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "stoker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "stoker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stoker
{{- end -}}

{{/* The labels that tell one release's objects from another's (immutable in selectors). */}}
{{- define "stoker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stoker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: include "stoker.componentSelectorLabels" (list . "agent") */}}
{{- define "stoker.componentSelectorLabels" -}}
{{ include "stoker.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* All labels of one component's objects: include "stoker.componentLabels" (list . "agent") */}}
{{- define "stoker.componentLabels" -}}
{{ include "stoker.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
Pod scheduling fields shared by both components:
include "stoker.podScheduling" (list . .Values.agent "agent")
*/}}
{{- define "stoker.podScheduling" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $c.runtimeClassName }}
runtimeClassName: {{ . | quote }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  {{- $constraint := . }}
  {{- if not (hasKey $constraint "labelSelector") }}
  {{- $constraint = merge (dict "labelSelector" (dict "matchLabels" (include "stoker.componentSelectorLabels" (list $root (index $ 2)) | fromYaml))) $constraint }}
  {{- end }}
  - {{ toYaml $constraint | indent 4 | trim }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
PromQL label matchers for one component's series: this release's scrape job where the chart
creates the monitor (ServiceMonitor: the Service's name; PodMonitor: namespace/name), else the
release's namespace. include "stoker.promSelector" (list . "operator")
*/}}
{{- define "stoker.promSelector" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $m := $root.Values.metrics -}}
{{- if $m.serviceMonitor.enabled -}}
namespace="{{ $root.Release.Namespace }}",job="{{ include "stoker.metricsServiceName" (list $root $component) }}"
{{- else if $m.podMonitor.enabled -}}
namespace="{{ $root.Release.Namespace }}",job="{{ $root.Release.Namespace }}/{{ include "stoker.fullname" $root }}"
{{- else -}}
namespace="{{ $root.Release.Namespace }}"
{{- end -}}
{{- end -}}


{{/*
The agents' model credentials, checked: a JSON object with "grants" (the agents' STOKER_CREDENTIALS),
"api" (Secrets read through the API server) and "mounted" (Secrets mounted into the agents).
*/}}
{{- define "stoker.credentials" -}}
{{- if .Values.agent.apiReadableSecrets }}
{{- fail "agent.apiReadableSecrets is gone: list each Secret in agent.credentialSecrets as {name: <secret>, hosts: [...], via: api}" }}
{{- end }}
{{- $grants := list }}
{{- $api := list }}
{{- $mounted := list }}
{{- range $i, $c := .Values.agent.credentialSecrets }}
{{- if not (kindIs "map" $c) }}
{{- fail (printf "agent.credentialSecrets[%d] (%v) has no hosts: write it as {name: %v, hosts: [models.example.com]}, naming the hosts this credential may be sent to" $i $c $c) }}
{{- end }}
{{- if not $c.name }}
{{- fail (printf "agent.credentialSecrets[%d] needs the name of a Secret" $i) }}
{{- end }}
{{- if not $c.hosts }}
{{- fail (printf "agent.credentialSecrets %s has no hosts: list the hosts this credential may be sent to (agents send it nowhere else)" $c.name) }}
{{- end }}
{{- $via := $c.via | default "mount" }}
{{- if not (has $via (list "mount" "api" "env")) }}
{{- fail (printf "agent.credentialSecrets %s: via must be mount, api or env, not %q" $c.name $via) }}
{{- end }}
{{- if and (eq $via "env") (not $c.env) }}
{{- fail (printf "agent.credentialSecrets %s: via env needs env, the variable that holds each key, e.g. {token: HUB_TOKEN}" $c.name) }}
{{- end }}
{{- $grant := dict "secret" $c.name "hosts" $c.hosts }}
{{- with $c.env }}{{ $_ := set $grant "env" . }}{{ end }}
{{- $grants = append $grants $grant }}
{{- if eq $via "api" }}{{ $api = append $api $c.name }}{{ end }}
{{- if eq $via "mount" }}{{ $mounted = append $mounted $c.name }}{{ end }}
{{- end }}
{{- toJson (dict "grants" $grants "api" $api "mounted" $mounted) }}
{{- end }}

{{/* The Secret holding the fleet's peer credential: the user's, or the one the chart generates. */}}
{{- define "stoker.agent.peerSecretName" -}}
{{- if .Values.agent.peer.existingSecret -}}
{{- .Values.agent.peer.existingSecret -}}
{{- else -}}
{{- printf "%s-peer" (include "stoker.agent.fullname" . | trunc 58 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}
