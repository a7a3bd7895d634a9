{{- define "stoker.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "stoker.labels" -}}
app.kubernetes.io/name: stoker
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
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
{{- end -}}
