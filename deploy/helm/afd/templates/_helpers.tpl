{{/* Names, labels and the pod parts every component shares. */}}

{{- define "afd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix: the release name when it contains the chart's name. */}}
{{- define "afd.fullname" -}}
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

{{/* <fullname>-<component>: call with (dict "ctx" $ "component" "attention"). */}}
{{- define "afd.componentName" -}}
{{- printf "%s-%s" (include "afd.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* What selectors match: never the chart's or the app's version, so upgrades keep them. */}}
{{- define "afd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "afd.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "afd.labels" -}}
{{ include "afd.selectorLabels" . }}
app.kubernetes.io/part-of: afd
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The controller's kube-selector: every object of this release (the component apart). */}}
{{- define "afd.releaseSelector" -}}
app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/name={{ include "afd.name" . }}
{{- end -}}

{{- define "afd.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{- define "afd.secretName" -}}
{{- default (include "afd.componentName" (dict "ctx" . "component" "secrets")) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The controller's Service, as members reach its gRPC port and TCPStore. */}}
{{- define "afd.controllerHost" -}}
{{ include "afd.componentName" (dict "ctx" . "component" "controller") }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{- define "afd.controllerAddress" -}}
{{ include "afd.controllerHost" . }}:50051
{{- end -}}

{{/* cuda when the role's pod has its GPU (resources.limits nvidia.com/gpu: 1), else cpu. */}}
{{- define "afd.device" -}}
{{- $limits := (.resources | default dict).limits | default dict -}}
{{- if gt (int (index $limits "nvidia.com/gpu" | default 0)) 0 -}}cuda{{- else -}}cpu{{- end -}}
{{- end -}}

{{/* Resources of an attention or FFN pod: the role's (a GPU limit of 0, a CPU-only install,
left out), plus the RDMA device when enabled. */}}
{{- define "afd.dataPlaneResources" -}}
{{- $resources := deepCopy (.role.resources | default dict) -}}
{{- $limits := $resources.limits | default dict -}}
{{- if eq (include "afd.device" .role) "cpu" -}}
{{- $_ := unset $limits "nvidia.com/gpu" -}}
{{- end -}}
{{- if .ctx.Values.rdma.enabled -}}
{{- $_ := set $limits .ctx.Values.rdma.resourceName .ctx.Values.rdma.resourceCount -}}
{{- end -}}
{{- if $limits -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Container security: the chart's, plus IPC_LOCK for RDMA on attention and FFN pods. */}}
{{- define "afd.containerSecurityContext" -}}
{{- $sc := deepCopy .ctx.Values.containerSecurityContext -}}
{{- if and .dataPlane .ctx.Values.rdma.enabled .ctx.Values.rdma.ipcLock -}}
{{- $caps := $sc.capabilities | default dict -}}
{{- $_ := set $caps "add" (list "IPC_LOCK") -}}
{{- $_ := set $sc "capabilities" $caps -}}
{{- end -}}
{{- toYaml $sc -}}
{{- end -}}

{{/* Where the processes may write, with the root filesystem read-only. */}}
{{- define "afd.env" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TRITON_CACHE_DIR
  value: /tmp/.cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/.cache/torchinductor
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* The instance's index (StatefulSet pod-index label) and address, and the data plane. */}}
{{- define "afd.instanceEnv" -}}
- name: POD_INDEX
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- with .Values.network.glooSocketIfname }}
- name: GLOO_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- with .Values.network.ncclSocketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- if .Values.rdma.enabled }}
{{- range $name, $value := .Values.rdma.ncclEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- range $name, $value := .Values.network.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* Pod-level settings every component shares. */}}
{{- define "afd.podSpecCommon" -}}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The model, /dev/shm, /tmp and the secrets: call with (dict "ctx" $ "copy" bool). With
model.source copy, a pod that copies (attention, FFN: they read every weight) gets an emptyDir
filled by its init container; the others (controller, gateway: they read only config.json,
the tokenizer and the safetensors headers) mount the source itself. */}}
{{- define "afd.volumes" -}}
{{- $model := .ctx.Values.model -}}
- name: model
{{- if eq $model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $model.pvc.claimName }}
    readOnly: true
{{- else if eq $model.source "hostPath" }}
  hostPath:
    path: {{ $model.hostPath.path }}
    type: Directory
{{- else if .copy }}
  emptyDir:
    sizeLimit: {{ $model.copy.sizeLimit }}
    {{- with $model.copy.medium }}
    medium: {{ . }}
    {{- end }}
- name: model-source
  {{- toYaml $model.copy.source | nindent 2 }}
{{- else }}
  {{- toYaml $model.copy.source | nindent 2 }}
{{- end }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .ctx.Values.shm.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .ctx.Values.tmp.sizeLimit }}
- name: secrets
  secret:
    secretName: {{ include "afd.secretName" .ctx }}
    defaultMode: 0440
{{- end -}}

{{/* The checkpoint read-only at /model, the secrets' files under /etc/afd. */}}
{{- define "afd.volumeMounts" -}}
{{- $model := .ctx.Values.model -}}
- name: model
  mountPath: /model
  readOnly: true
  {{- if and $model.subPath (not (and .copy (eq $model.source "copy"))) }}
  subPath: {{ $model.subPath }}
  {{- end }}
- name: shm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: secrets
  mountPath: /etc/afd
  readOnly: true
{{- end -}}

{{/* With model.source copy: the checkpoint into the pod's emptyDir before the process starts. */}}
{{- define "afd.modelInitContainers" -}}
{{- if eq .Values.model.source "copy" -}}
initContainers:
  - name: copy-model
    image: {{ include "afd.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: [sh, -c]
    args:
      - cp -R {{ trimSuffix "/" (printf "/model-source/%s" .Values.model.subPath) }}/. /model/
    securityContext:
      {{- toYaml .Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - name: model-source
        mountPath: /model-source
        readOnly: true
      - name: model
        mountPath: /model
{{- end -}}
{{- end -}}

{{/* NetworkPolicy peers: the release's controller, attention and FFN pods. */}}
{{- define "afd.clusterPeers" -}}
- podSelector:
    matchLabels:
      {{- include "afd.selectorLabels" (dict "ctx" . "component" "") | nindent 6 }}
    matchExpressions:
      - {key: app.kubernetes.io/component, operator: In, values: [controller, attention, ffn]}
{{- end -}}

{{/* NetworkPolicy peers: Prometheus, where networkPolicy.metrics says it runs. */}}
{{- define "afd.metricsPeers" -}}
{{- $m := .Values.networkPolicy.metrics -}}
- namespaceSelector:
    {{- toYaml $m.namespaceSelector | nindent 4 }}
  podSelector:
    {{- toYaml $m.podSelector | nindent 4 }}
{{- end -}}

{{/* Ingress rules of the controller, attention and FFN pods (call with (dict "ctx" $
"fromGateway" bool)): any TCP port from each other (torch.distributed's ephemeral ports
included), the gRPC port from the gateway when it calls this component, the metrics port from
Prometheus. */}}
{{- define "afd.clusterIngress" -}}
- from:
    {{- include "afd.clusterPeers" .ctx | nindent 4 }}
{{- if .fromGateway }}
- from:
    - podSelector:
        matchLabels:
          {{- include "afd.selectorLabels" (dict "ctx" .ctx "component" "gateway") | nindent 10 }}
  ports:
    - {port: 50051, protocol: TCP}
{{- end }}
- from:
    {{- include "afd.metricsPeers" .ctx | nindent 4 }}
  ports:
    {{- $processes := int (.processes | default 1) }}
    {{- if gt $processes 1 }}
    - {port: 9400, endPort: {{ add 9400 (sub $processes 1) }}, protocol: TCP}
    {{- else }}
    - {port: 9400, protocol: TCP}
    {{- end }}
{{- end -}}

{{/* The controller's gRPC threads: a member may hold two (a plan wait and a heartbeat), at
the most members (processes: an FFN pod runs gpusPerInstance) the release can have; as `afd controller` sizes it, at least 64. */}}
{{- define "afd.controllerWorkers" -}}
{{- $a := .Values.attention -}}
{{- $f := .Values.ffn -}}
{{- $ffn := mul (max $f.replicas $f.autoscaling.maxReplicas) (int $f.gpusPerInstance) -}}
{{- $members := add (max $a.replicas $a.autoscaling.maxReplicas) $ffn -}}
{{- max 64 (add 16 (mul 2 $members)) -}}
{{- end }}
