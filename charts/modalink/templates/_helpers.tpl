{{- define "modalink.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "modalink.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "component" "image-encoder") */}}
{{- define "modalink.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "modalink.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* the encoder settings of one modality: encoderDefaults overlaid with encoders.<modality> */}}
{{- define "modalink.encoder" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.encoderDefaults) (deepCopy (index .root.Values.encoders .modality | default dict))) -}}
{{- end -}}

{{/* the modalities of .Values.encoders (built-in or plugin: a key is all a modality needs), in modalink.modality's
order: the built-ins (modalink.modality.BUILTIN) in theirs, then plugins by name; a JSON list */}}
{{- define "modalink.modalities" -}}
{{- $builtin := list "image" "audio" "imu" "video" -}}
{{- $out := list -}}
{{- range $m := $builtin -}}
{{- if hasKey $.Values.encoders $m }}{{ $out = append $out $m }}{{ end -}}
{{- end -}}
{{- range $m := keys .Values.encoders | sortAlpha -}}
{{- if not (has $m $builtin) }}{{ $out = append $out $m }}{{ end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* the modalities whose encoders are enabled (encoderDefaults.enabled overlaid with encoders.<m>.enabled), in
the order of modalink.modalities; a JSON list */}}
{{- define "modalink.enabledModalities" -}}
{{- $out := list -}}
{{- range $m := include "modalink.modalities" . | fromJsonArray -}}
{{- if (include "modalink.encoder" (dict "root" $ "modality" $m) | fromYaml).enabled }}{{ $out = append $out $m }}{{ end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* the queues of one worker, (dict "root" $ "worker" $w): its own, or by default the caption queue of every
enabled encoder and caption.unknown (jobs of a modality the gateway could not tell) */}}
{{- define "modalink.workerQueues" -}}
{{- if .worker.queues -}}
{{- toJson .worker.queues -}}
{{- else -}}
{{- $out := list -}}
{{- range $m := include "modalink.enabledModalities" .root | fromJsonArray -}}
{{- $out = append $out (printf "caption.%s" $m) -}}
{{- end -}}
{{- toJson (append $out "caption.unknown") -}}
{{- end -}}
{{- end -}}

{{/* MODALINK_REDIS_URL; with a password, "$(REDIS_PASSWORD)" in it is filled in by Kubernetes (modalink.redisEnv) */}}
{{- define "modalink.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ if include "modalink.redisSecret" . }}:$(REDIS_PASSWORD)@{{ end }}{{ include "modalink.fullname" . }}-redis:6379/0
{{- else -}}
{{- if and (include "modalink.redisSecret" .) (not (contains "$(REDIS_PASSWORD)" .Values.redis.externalUrl)) -}}
{{- fail "redis.externalUrl must carry the password as $(REDIS_PASSWORD), e.g. redis://:$(REDIS_PASSWORD)@host:6379/0 (or unset redis.auth.password/existingSecret)" -}}
{{- end -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* the Secret holding the Redis password, or empty when Redis has none: the chart's Redis (auth.enabled) or an
external one given auth.password or auth.existingSecret */}}
{{- define "modalink.redisSecret" -}}
{{- $a := .Values.redis.auth -}}
{{- if $a.enabled -}}
{{- if $a.existingSecret -}}{{ $a.existingSecret }}
{{- else if or .Values.redis.enabled $a.password -}}{{ include "modalink.fullname" . }}-redis
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "modalink.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.existingSecretKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{/* env of a Redis client (gateway, workers, beat): the password from its Secret, then the URL that carries it */}}
{{- define "modalink.redisEnv" -}}
{{- if include "modalink.redisSecret" . }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "modalink.redisSecret" . }}, key: {{ include "modalink.redisSecretKey" . }}}
{{- end }}
- name: MODALINK_REDIS_URL
  value: {{ include "modalink.redisUrl" . | quote }}
{{- end -}}

{{/* NetworkPolicy peers: this release's pods of the given components, (dict "root" $ "components" (list ...)) */}}
{{- define "modalink.peers" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ .root.Chart.Name }}
      app.kubernetes.io/instance: {{ .root.Release.Name }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: {{ toJson .components }}
{{- end -}}

{{/* components of the worker Deployments: "caption" (any caption.* queue), "finetune" or "all" */}}
{{- define "modalink.workerComponents" -}}
{{- $out := list -}}
{{- range $w := .root.Values.workers -}}
{{- $finetune := has "finetune" $w.queues -}}
{{- if or (eq $.which "all") (and (eq $.which "finetune") $finetune) (and (eq $.which "caption") (not $finetune)) -}}
{{- $out = append $out (printf "worker-%s" $w.name) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "modalink.claim" -}}
{{- .Values.storage.existingClaim | default (printf "%s-shared" (include "modalink.fullname" .)) -}}
{{- end -}}

{{/* pod-level pieces every modalink pod shares: pull secrets, security context, volumes */}}
{{- define "modalink.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{ toYaml . | nindent 2 }}
{{- end }}
securityContext: {{ toYaml .Values.podSecurityContext | nindent 2 }}
volumes:
  - name: shared
    persistentVolumeClaim:
      claimName: {{ include "modalink.claim" . }}
  - name: tmp
    emptyDir: {}
  - name: runs  # training runs and feature caches: the image's /cache is read-only
    emptyDir: {}
  - name: features
    emptyDir: {}
  {{- if .Values.tls.existingSecret }}
  - name: tls
    secret: {secretName: {{ .Values.tls.existingSecret }}}
  {{- end }}
{{- end -}}

{{/* seeds the shared volume with the image's trained adapters once (cp -n never overwrites) */}}
{{- define "modalink.seedAdapters" -}}
initContainers:
  - name: seed-adapters
    image: {{ include "modalink.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["sh", "-c", "mkdir -p /shared/adapters /shared/jobs /shared/pairs && cp -rn /app/adapters/. /shared/adapters/"]
    securityContext: {{ toYaml .Values.securityContext | nindent 6 }}
    resources:
      requests: {cpu: 50m, memory: 64Mi}
      limits: {cpu: 200m, memory: 128Mi}
    volumeMounts:
      - {name: shared, mountPath: /shared}
{{- end -}}

{{/* container-level pieces: env from the ConfigMap and the API key Secret, security context, mounts */}}
{{- define "modalink.containerCommon" -}}
image: {{ include "modalink.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "modalink.fullname" . }}-config
  - secretRef:
      name: {{ .Values.existingApiKeySecret | default (printf "%s-api-keys" (include "modalink.fullname" .)) }}
securityContext: {{ toYaml .Values.securityContext | nindent 2 }}
# the endpoints controller and load balancers take a moment to stop sending traffic after a pod starts
# terminating; the service drains its calls in flight after SIGTERM (MODALINK_SHUTDOWN_GRACE_S)
lifecycle:
  preStop:
    exec: {command: ["sleep", "3"]}
volumeMounts:
  - {name: shared, mountPath: /shared}
  - {name: tmp, mountPath: /tmp}
  - {name: runs, mountPath: /cache/runs}
  - {name: features, mountPath: /cache/features}
  {{- if .Values.tls.existingSecret }}
  - {name: tls, mountPath: /etc/modalink/tls, readOnly: true}
  {{- end }}
{{- end -}}

{{- define "modalink.gpuResources" -}}
{{- $r := deepCopy .resources -}}
{{- if gt (int .gpu) 0 -}}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (int .gpu)) ($r.limits | default dict)) -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{- define "modalink.promAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
annotations:
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .port | quote }}
  prometheus.io/path: /metrics
{{- end }}
{{- end -}}
