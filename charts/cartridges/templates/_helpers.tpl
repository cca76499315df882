{{/* Names and labels shared by every template. */}}

{{- define "cartridges.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cartridges.labels" -}}
app.kubernetes.io/part-of: cartridges
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "cartridges.operatorSelector" -}}
app.kubernetes.io/name: cartridges-operator
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{- define "cartridges.minioSelector" -}}
app.kubernetes.io/name: cartridges-minio
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{- define "cartridges.serviceAccountName" -}}
{{- default (include "cartridges.fullname" .) .Values.operator.serviceAccount.name -}}
{{- end -}}

{{/* An image reference; the tag defaults to the chart's appVersion. A tag "@sha256:<hex>" pins a digest alone
(repository@sha256:...), "1.2@sha256:<hex>" a tag and its digest (repository:1.2@sha256:...). */}}
{{- define "cartridges.image" -}}
{{- $image := index . 0 -}}{{- $root := index . 1 -}}
{{- $tag := default $root.Chart.AppVersion $image.tag -}}
{{- printf "%s%s%s" $image.repository (ternary "" ":" (hasPrefix "@" $tag)) $tag -}}
{{- end -}}

{{/* A pod spec's imagePullSecrets (the chart's top-level list), for a pod spec indented by 6. */}}
{{- define "cartridges.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
{{- end }}
{{- end -}}

{{/* The operator's settings, for the checksum that restarts it when they change. The store credentials are left
out: a pod annotation is readable by anyone who may read pods, and a hash of the keys would let them test guesses
offline (a salted hash needs a salt kept secret, which a chart rendered by `helm template` has nowhere to keep).
Rotating the keys therefore restarts nothing: `kubectl rollout restart` the operator and serving Deployments. */}}
{{- define "cartridges.settingsChecksum" -}}
{{- $store := omit .Values.store "credentials" -}}
{{- $credentials := pick .Values.store.credentials "existingSecret" "secretName" -}}
{{- toJson (list $store $credentials .Values.trainer .Values.serving .Values.imagePullSecrets) | sha256sum -}}
{{- end -}}

{{/* The Secret with accessKey/secretKey: an existing one, or the one this chart creates. */}}
{{- define "cartridges.storeSecret" -}}
{{- default .Values.store.credentials.secretName .Values.store.credentials.existingSecret -}}
{{- end -}}

{{- define "cartridges.minioName" -}}
{{- printf "%s-minio" (include "cartridges.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* host:port or http(s)://host:port of the S3 API; the bundled MinIO when it is on and no endpoint is given. */}}
{{- define "cartridges.storeEndpoint" -}}
{{- if .Values.store.endpoint -}}
{{- .Values.store.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s.%s.svc:9000" (include "cartridges.minioName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The port the operator reaches the store on: the one store.endpoint names, else what its S3 client picks: 443
with TLS (an https:// endpoint or store.tls.enabled), 80 without. */}}
{{- define "cartridges.storePort" -}}
{{- $endpoint := include "cartridges.storeEndpoint" . -}}
{{- $url := urlParse (ternary $endpoint (printf "//%s" $endpoint) (contains "://" $endpoint)) -}}
{{- $named := regexFind ":[0-9]+$" $url.host | trimPrefix ":" -}}
{{- $tls := or (eq $url.scheme "https") .Values.store.tls.enabled -}}
{{- $named | default (ternary "443" "80" $tls) -}}
{{- end -}}

{{- define "cartridges.storeRoot" -}}
{{- if .Values.store.prefix -}}
{{- printf "s3://%s/%s" .Values.store.bucket (trimAll "/" .Values.store.prefix) -}}
{{- else -}}
{{- printf "s3://%s" .Values.store.bucket -}}
{{- end -}}
{{- end -}}

{{/* Namespaces whose Cartridges get serving NetworkPolicies: the explicit list, else the watched namespaces. */}}
{{- define "cartridges.servingNamespaces" -}}
{{- $list := .Values.networkPolicy.servingNamespaces | default .Values.operator.watchNamespaces -}}
{{- toJson $list -}}
{{- end -}}

{{/* Namespaces where the operator runs training and serving pods: the watched and serving namespaces; empty when
the operator watches every namespace. */}}
{{- define "cartridges.workloadNamespaces" -}}
{{- $watched := .Values.operator.watchNamespaces -}}
{{- toJson (ternary (concat $watched (include "cartridges.servingNamespaces" . | fromJsonArray) | uniq) list (not (empty $watched))) -}}
{{- end -}}

{{/* Egress rule: DNS, to kube-system's pods and networkPolicy.dns.cidrs. */}}
{{- define "cartridges.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
    {{- range .Values.networkPolicy.dns.cidrs }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- end -}}

{{/* Egress rule: the object store, from any namespace. The bundled MinIO's pods, else networkPolicy.store.cidrs
(without any: every address but link-local, where cloud metadata services hand out node credentials) on
networkPolicy.store.ports and the port of store.endpoint. */}}
{{- define "cartridges.storeEgress" -}}
{{- $np := .Values.networkPolicy -}}
{{- if and .Values.minio.enabled (not .Values.store.endpoint) -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .Release.Namespace | quote }}
      podSelector:
        matchLabels:
          {{- include "cartridges.minioSelector" . | nindent 10 }}
  ports:
    - {port: 9000, protocol: TCP}
{{- else -}}
{{- $storePorts := list }}
{{- range $np.store.ports }}
{{- $storePorts = append $storePorts (int .) }}
{{- end }}
{{- /* the endpoint's own port, wherever it is: the listed ports alone would block a store on another */}}
{{- $storePorts = append $storePorts (include "cartridges.storePort" . | int) | uniq }}
- ports:
    {{- range $storePorts }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  to:
  {{- range $np.store.cidrs }}
    - ipBlock: {cidr: {{ . | quote }}}
  {{- else }}
    - ipBlock: {cidr: 0.0.0.0/0, except: [169.254.0.0/16]}
    - ipBlock: {cidr: "::/0", except: ["fe80::/10"]}
  {{- end }}
{{- end -}}
{{- end -}}
