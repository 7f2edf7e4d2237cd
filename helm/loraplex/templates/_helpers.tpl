{{/* Names, labels and images shared by every template. */}}

{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplex.fullname" -}}
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

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: serving
{{- end }}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraplex.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* registry/repository:tag, the registry left out when empty. */}}
{{- define "loraplex.imageRef" -}}
{{- $tag := .tag | default .root.Chart.AppVersion -}}
{{- if .registry -}}
{{ printf "%s/%s:%s" .registry .repository $tag }}
{{- else -}}
{{ printf "%s:%s" .repository $tag }}
{{- end -}}
{{- end }}

{{- define "loraplex.shardImage" -}}
{{- include "loraplex.imageRef" (dict "root" . "registry" .Values.image.registry "repository" .Values.image.repository "tag" .Values.image.tag) }}
{{- end }}

{{- define "loraplex.routerImage" -}}
{{- $r := .Values.router.image -}}
{{- include "loraplex.imageRef" (dict "root" . "registry" (default .Values.image.registry $r.registry) "repository" $r.repository "tag" (default .Values.image.tag $r.tag)) }}
{{- end }}

{{/* The shards listen on unix sockets in an emptyDir the router shares: never on the pod network. */}}
{{- define "loraplex.socketDir" -}}/run/loraplex{{- end }}

{{- define "loraplex.shardAddresses" -}}
{{- $dir := include "loraplex.socketDir" . -}}
{{- $addrs := list -}}
{{- range $rank := until (int .Values.numShard) -}}
{{- $addrs = append $addrs (printf "unix://%s/shard-%d.sock" $dir $rank) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end }}

{{- define "loraplex.modelClaimName" -}}
{{- default (printf "%s-models" (include "loraplex.fullname" .)) .Values.storage.model.existingClaim }}
{{- end }}

{{- define "loraplex.authSecretName" -}}
{{- default (printf "%s-auth" (include "loraplex.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "loraplex.tenantsEnabled" -}}
{{- if or .Values.auth.tenants .Values.auth.existingSecret }}true{{ end }}
{{- end }}

{{- define "loraplex.adminEnabled" -}}
{{- if or .Values.auth.adminToken .Values.auth.existingSecret }}true{{ end }}
{{- end }}

{{/* A value as an environment string: whole numbers without an exponent (YAML numbers arrive as floats, and
     toString would write 1048576 as 1.048576e+06, which no int flag accepts). */}}
{{- define "loraplex.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . | toString | quote -}}
{{- else -}}
{{- toString . | quote -}}
{{- end -}}
{{- end }}

{{/* The Endpoint Picker's objects: their own component label, so that no serving selector matches them. */}}
{{- define "loraplex.pickerName" -}}
{{- printf "%s-epp" (include "loraplex.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplex.pickerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: endpoint-picker
{{- end }}

{{- define "loraplex.pickerLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loraplex.pickerSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The picker the pool names: the chart's own, or the one inferencePool.endpointPicker.external names. */}}
{{- define "loraplex.pickerService" -}}
{{- default (include "loraplex.pickerName" .) .Values.inferencePool.endpointPicker.external }}
{{- end }}

{{/* The router's HTTP port in the pod (its --port default): its containerPort and the InferencePool's target port. */}}
{{- define "loraplex.httpPort" -}}8080{{- end }}
