{{- define "cheapspot.name" -}}cheapspot{{- end -}}

{{- define "cheapspot.fullname" -}}
{{- if contains "cheapspot" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-cheapspot" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cheapspot.labels" -}}
app.kubernetes.io/name: {{ include "cheapspot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cheapspot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cheapspot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "cheapspot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cheapspot.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
