{{/* The image of one component: (dict "root" $ "image" .Values.<component>.image) */}}
{{- define "stoker.image" -}}
{{ .image.repository }}:{{ .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{- define "stoker.pullPolicy" -}}
{{ .image.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end -}}

{{- define "stoker.labels" -}}
app.kubernetes.io/name: stoker
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
