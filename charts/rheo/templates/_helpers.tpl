{{/* Names and labels. */}}
{{- define "rheo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rheo.fullname" -}}
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

{{- define "rheo.labels" -}}
app.kubernetes.io/name: {{ include "rheo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "rheo.commonLabels" . }}
{{- end -}}

{{- define "rheo.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rheo
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "component" "gateway") */}}
{{- define "rheo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rheo.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "rheo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rheo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rheo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "rheo.natsSecretName" -}}
{{- default (printf "%s-nats-auth" (include "rheo.fullname" .)) .Values.nats.auth.existingSecret -}}
{{- end -}}

{{- define "rheo.linkSecretName" -}}
{{- .Values.ditStage.linkKey.existingSecret | default (printf "%s-link" (include "rheo.fullname" .)) }}
{{- end }}

{{- define "rheo.playbackSecretName" -}}
{{- default (printf "%s-playback" (include "rheo.fullname" .)) .Values.playback.existingSecret -}}
{{- end -}}

{{- define "rheo.playbackEnv" -}}
- name: RHEO_PLAYBACK__SIGNING_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "rheo.playbackSecretName" . }}
      key: signing-keys
{{- end -}}

{{- define "rheo.apiSecretName" -}}
{{- default (printf "%s-api" (include "rheo.fullname" .)) .Values.api.existingSecret -}}
{{- end -}}

{{- define "rheo.natsServiceName" -}}
{{- printf "%s-nats" (include "rheo.fullname" .) -}}
{{- end -}}

{{- define "rheo.natsTlsSecretName" -}}
{{- printf "%s-nats-tls" (include "rheo.fullname" .) -}}
{{- end -}}

{{/* The NATS pod's variable holding one component's password: (include "rheo.natsPasswordEnv" "dit-stage") */}}
{{- define "rheo.natsPasswordEnv" -}}
{{- printf "RHEO_NATS_PASSWORD_%s" (. | upper | replace "-" "_") -}}
{{- end -}}

{{/* Where the services find the CA that signs the NATS server certificate (empty: the system CAs). */}}
{{- define "rheo.natsCaSecret" -}}
{{- if .Values.nats.deploy -}}
{{- include "rheo.natsTlsSecretName" . -}}
{{- else -}}
{{- .Values.nats.tls.caSecret -}}
{{- end -}}
{{- end -}}

{{- define "rheo.natsUrl" -}}
{{- if .Values.nats.deploy -}}
{{- printf "tls://%s.%s.svc:4222" (include "rheo.natsServiceName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{/* "true" when the RTMPS listener is on (config.ingest.rtmps_port set); it then needs ingest.tls.secretName. */}}
{{- define "rheo.rtmps" -}}
{{- if not (kindIs "invalid" (default dict .Values.config.ingest).rtmps_port) -}}
{{- $_ := required "ingest.tls.secretName (a kubernetes.io/tls Secret) is required when config.ingest.rtmps_port is set" .Values.ingest.tls.secretName -}}
true
{{- end -}}
{{- end -}}

{{/* The chart's nats-server config: JetStream, 8 MB payloads as services/natsd.py, TLS only, one user per
component with its generated permissions; passwords are environment references, so the config holds no secret.
Helm's toJson escapes ">" as \u003e, which nats-server's parser refuses. */}}
{{- define "rheo.natsConf" -}}
{{- $roles := (.Files.Get "files/nats-permissions.json" | fromJson).roles -}}
port: 4222
http_port: 8222
max_payload: 8388608
max_pending: 268435456
server_name: {{ include "rheo.natsServiceName" . | quote }}
jetstream {
  store_dir: "/data"
  max_file_store: {{ .Values.nats.jetstream.maxFileStore | quote }}
}
tls {
  cert_file: "/etc/nats-tls/tls.crt"
  key_file: "/etc/nats-tls/tls.key"
  timeout: 2
}
authorization {
  users: [
{{- range $role := keys $roles | sortAlpha }}
{{- $r := get $roles $role }}
    {user: {{ $r.user | quote }}, password: ${{ include "rheo.natsPasswordEnv" $role }}, permissions: {{ toJson $r.permissions | replace "\\u003e" ">" }}}
{{- end }}
  ]
}
{{- end -}}

{{- define "rheo.modelDir" -}}
{{- if .Values.model.subPath -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.subPath) -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{/* The rheo config file (RHEO_CONFIG): .Values.config plus the keys this chart owns. */}}
{{- define "rheo.configYaml" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $nats := dict "url" (include "rheo.natsUrl" .) -}}
{{- if include "rheo.natsCaSecret" . -}}
{{- $_ := set $nats "tls_ca_file" "/var/run/secrets/rheo/nats-ca/ca.crt" -}}
{{- end -}}
{{- $_ := set $cfg "nats" (merge $nats (default dict $cfg.nats)) -}}
{{- $_ := set $cfg "controller" (merge (dict "stages" (int .Values.ditStage.stages) "rings" (int .Values.ditStage.rings)) (default dict $cfg.controller)) -}}
{{- $workloads := dict "ring_workload" "StatefulSet/dit" "decoder_workload" (printf "Deployment/%s-decoder" (include "rheo.fullname" .)) "ingest_workload" (printf "Deployment/%s-ingest" (include "rheo.fullname" .)) -}}
{{- $_ := set $cfg.controller "autoscale" (merge $workloads (default dict $cfg.controller.autoscale)) -}}
{{- if ne .Values.model.source "none" -}}
{{- $_ := set $cfg "model" (merge (dict "model_dir" (include "rheo.modelDir" .)) (default dict $cfg.model)) -}}
{{- end -}}
{{- if include "rheo.rtmps" . -}}
{{- $tls := dict "tls_cert_file" "/var/run/secrets/rheo/rtmps/tls.crt" "tls_key_file" "/var/run/secrets/rheo/rtmps/tls.key" -}}
{{- $_ := set $cfg "ingest" (merge $tls (default dict $cfg.ingest)) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Ports every service's probes and metrics use. */}}
{{/* The autoscaler's mode ("disabled" unless config.controller.autoscale.mode says otherwise). */}}
{{- define "rheo.autoscaleMode" -}}
{{- $as := default dict (default dict .Values.config.controller).autoscale -}}
{{- default "disabled" $as.mode -}}
{{- end -}}

{{- define "rheo.metricsPort" -}}
{{- int .Values.config.telemetry.metrics_port -}}
{{- end -}}
{{- define "rheo.drainSeconds" -}}
{{- int (ceil (default 10.0 .Values.config.lifecycle.drain_timeout_s)) -}}
{{- end -}}

{{/*
One pod template. Arguments (dict): root, component, command (the `rheo` subcommand), spec (the component's
values), gpus, weights (mount the model volume), ports (YAML list of extra container ports), env (YAML list of
extra env vars), volumes / volumeMounts (YAML lists), apiToken (mount the service-account token: only the
controller, for its leader Lease).
*/}}
{{- define "rheo.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "rheo.commonLabels" $root | nindent 4 }}
    {{- include "rheo.selectorLabels" (dict "root" $root "component" .component) | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "rheo.configYaml" $root | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "rheo.serviceAccountName" $root }}
  automountServiceAccountToken: {{ .apiToken | default false }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ add (include "rheo.drainSeconds" $root) 10 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: {{ .component }}
      image: {{ include "rheo.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args: [{{ .command | quote }}]
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      ports:
        - name: metrics
          containerPort: {{ include "rheo.metricsPort" $root }}
          protocol: TCP
        {{- with .ports }}
        {{- . | nindent 8 }}
        {{- end }}
      env:
        - name: RHEO_CONFIG
          value: /etc/rheo/config.yaml
        - name: HOME
          value: /tmp
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: RHEO_NATS__NAME
          value: "$(POD_NAME)"
        {{- /* the component's own bus identity: its user (or creds) and the only inboxes it may read */}}
        - name: RHEO_NATS__INBOX_PREFIX
          value: {{ printf "_INBOX.%s" .component | quote }}
        {{- if eq $v.nats.auth.type "userPassword" }}
        - name: RHEO_NATS__USER
          value: {{ printf "rheo-%s" .component | quote }}
        - name: RHEO_NATS__PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ include "rheo.natsSecretName" $root }}
              key: {{ .component }}
        {{- else }}
        - name: RHEO_NATS__CREDS_FILE
          value: {{ printf "/var/run/secrets/rheo/nats/%s.creds" .component | quote }}
        {{- end }}
        {{- with .env }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- $probes := $v.probes }}
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $probes.startup.periodSeconds }}
        timeoutSeconds: {{ $probes.startup.timeoutSeconds }}
        failureThreshold: {{ $probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: {{ $probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $probes.readiness.failureThreshold }}
      resources:
        {{- $res := deepCopy (default dict .spec.resources) }}
        {{- if gt (int .gpus) 0 }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $res.limits)) }}
        {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $res.requests)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/rheo
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if eq $v.nats.auth.type "creds" }}
        - name: nats-creds
          mountPath: /var/run/secrets/rheo/nats
          readOnly: true
        {{- end }}
        {{- if include "rheo.natsCaSecret" $root }}
        - name: nats-ca
          mountPath: /var/run/secrets/rheo/nats-ca
          readOnly: true
        {{- end }}
        {{- if and .weights (ne $v.model.source "none") }}
        - name: weights
          mountPath: {{ $v.model.mountPath }}
          readOnly: true
        {{- end }}
        {{- with .volumeMounts }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "rheo.fullname" $root }}-config
    - name: tmp
      emptyDir:
        sizeLimit: {{ default $v.tmpSizeLimit .tmpSizeLimit }}
    {{- if eq $v.nats.auth.type "creds" }}
    - name: nats-creds
      secret:
        secretName: {{ include "rheo.natsSecretName" $root }}
        items:
          - key: {{ printf "%s.creds" .component }}
            path: {{ printf "%s.creds" .component }}
    {{- end }}
    {{- with include "rheo.natsCaSecret" $root }}
    - name: nats-ca
      secret:
        secretName: {{ . }}
        items:
          - key: ca.crt
            path: ca.crt
    {{- end }}
    {{- with .volumes }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- if and .weights (ne $v.model.source "none") }}
    - name: weights
      {{- if eq $v.model.source "pvc" }}
      persistentVolumeClaim:
        claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $v.model.pvc.claimName }}
        readOnly: true
      {{- else if eq $v.model.source "hostPath" }}
      hostPath:
        path: {{ required "model.hostPath.path is required when model.source is hostPath" $v.model.hostPath.path }}
        type: Directory
      {{- else if eq $v.model.source "image" }}
      image:
        reference: {{ required "model.image.reference is required when model.source is image" $v.model.image.reference }}
        pullPolicy: {{ $v.model.image.pullPolicy }}
      {{- end }}
    {{- end }}
  {{- with .spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* A PodDisruptionBudget: (dict "root" $ "component" "gateway" "spec" .Values.gateway) */}}
{{- define "rheo.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "rheo.fullname" .root }}-{{ .component }}
  labels:
    {{- include "rheo.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  maxUnavailable: {{ .spec.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "rheo.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end -}}

{{/* The metrics Service of a component (ClusterIP, never exposed outside). */}}
{{- define "rheo.metricsService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "rheo.fullname" .root }}-{{ .component }}-metrics
  labels:
    {{- include "rheo.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    rheo.io/metrics: "true"
spec:
  type: ClusterIP
  clusterIP: None
  selector:
    {{- include "rheo.selectorLabels" (dict "root" .root "component" .component) | nindent 4 }}
  ports:
    - name: metrics
      port: {{ include "rheo.metricsPort" .root }}
      targetPort: metrics
      protocol: TCP
{{- end -}}
