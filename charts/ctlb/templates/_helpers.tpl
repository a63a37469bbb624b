{{/* Names and labels shared by every object. */}}
{{- define "ctlb.labels" -}}
app.kubernetes.io/name: ctlbd
app.kubernetes.io/part-of: ctlb
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ctlb.selectorLabels" -}}
app.kubernetes.io/name: ctlbd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image: repository@digest when a digest is set, else repository:tag. */}}
{{- define "ctlb.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "ctlb.socket" -}}
{{ .Values.runDir }}/ctlbd.sock
{{- end -}}

{{/* The capabilities ctlbd needs, found by test/deploy (caps_test.go). */}}
{{- define "ctlb.capabilities" -}}
{{- concat (list "SYS_ADMIN" "SYS_PTRACE") .Values.ctlbd.extraCapabilities | toJson -}}
{{- end -}}

{{/* The install-cni flags of the init container and of the watcher. */}}
{{- define "ctlb.cniArgs" -}}
- --bin-dir=/host/cni/bin
- --conf-dir=/host/cni/net.d
# Written into the conflist and read by the plugin on the host: host
# paths, matching bpffs, socket and stateDir in ctlbd.json (the plugin
# leaves pending attachments in stateDir for ctlbd to complete).
- --bpffs={{ .Values.bpffs }}
- --socket={{ include "ctlb.socket" . }}
- --state-dir={{ .Values.runDir }}
{{- end -}}
