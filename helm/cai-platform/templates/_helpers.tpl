{{/* Names, labels, the run config and the pod pieces shared by the retrain job and the MLflow server. */}}

{{- define "cai-platform.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cai-platform.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cai-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cai-platform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cai-platform.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "cai-platform.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: cai-platform
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "cai-platform.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cai-platform.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cai-platform.configName" -}}
{{- printf "%s-config" (include "cai-platform.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cai-platform.envName" -}}
{{- .Values.pipeline.envConfigMap -}}
{{- end -}}

{{- define "cai-platform.mlflowName" -}}
{{- printf "%s-mlflow" (include "cai-platform.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* An image reference; call with (dict "image" .Values.images.cpu "root" $). */}}
{{- define "cai-platform.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* s3://<bucket>/<prefix>; call with (dict "root" $ "prefix" "..."). */}}
{{- define "cai-platform.s3Uri" -}}
{{- printf "s3://%s/%s" .root.Values.s3.bucket .prefix -}}
{{- end -}}

{{/* The S3 endpoint every client uses: s3.endpointUrl, or AWS S3's regional endpoint. */}}
{{- define "cai-platform.s3EndpointUrl" -}}
{{- .Values.s3.endpointUrl | default (printf "https://s3.%s.amazonaws.com" .Values.s3.region) | trimSuffix "/" -}}
{{- end -}}

{{- define "cai-platform.s3SecretName" -}}
{{- required "s3.credentialsSecret.name is required: the name of an existing Secret with the S3 access key pair" .Values.s3.credentialsSecret.name -}}
{{- end -}}

{{- define "cai-platform.mlflowSecretName" -}}
{{- required "mlflow.credentialsSecret.name is required: the name of an existing Secret with the MLflow client credentials" .Values.mlflow.credentialsSecret.name -}}
{{- end -}}

{{/* The short Service name resolves from every pod of the namespace, whatever the namespace is called. */}}
{{- define "cai-platform.mlflowTrackingUri" -}}
{{- if .Values.mlflow.trackingUri -}}
{{- .Values.mlflow.trackingUri -}}
{{- else if .Values.mlflow.server.enabled -}}
{{- printf "http://%s:%d" (include "cai-platform.mlflowName" .) (int .Values.mlflow.server.port) -}}
{{- else -}}
{{- fail "mlflow.trackingUri is required when mlflow.server.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/*
The run config (cai_lib/platform/run_config.py RunConfig) the retrain job submits with: the user's pipeline
params over the chart's artifact root and tracking URI, and a deploy section built from the values.
*/}}
{{- define "cai-platform.runConfig" -}}
{{- $params := deepCopy .Values.pipeline.params -}}
{{- $resources := dict -}}
{{- range $stage, $profileName := .Values.pipeline.stageProfiles -}}
{{- $profile := index $.Values.gpuProfiles $profileName -}}
{{- if not $profile -}}
{{- fail (printf "pipeline.stageProfiles.%s names %q, which is not a key of gpuProfiles" $stage $profileName) -}}
{{- end -}}
{{- $_ := set $resources $stage $profile -}}
{{- end -}}
{{- $s3 := .Values.s3.credentialsSecret -}}
{{- $secrets := dict
  "s3_secret" (include "cai-platform.s3SecretName" .)
  "s3_keys" (dict $s3.accessKeyKey "AWS_ACCESS_KEY_ID" $s3.secretKeyKey "AWS_SECRET_ACCESS_KEY")
  "mlflow_secret" (include "cai-platform.mlflowSecretName" .)
  "mlflow_keys" .Values.mlflow.credentialsSecret.keys
  "env_configmap" (include "cai-platform.envName" .) -}}
{{- with .Values.huggingface.tokenSecret.name }}
{{- $_ := set $secrets "hf_secret" . }}
{{- $_ := set $secrets "hf_keys" (dict $.Values.huggingface.tokenSecret.key "HF_TOKEN") }}
{{- end }}
{{- $deploy := dict
  "image_cpu" (include "cai-platform.image" (dict "image" .Values.images.cpu "root" .))
  "image_gpu" (include "cai-platform.image" (dict "image" .Values.images.gpu "root" .))
  "resources" $resources
  "retries" .Values.pipeline.retries
  "secrets" $secrets -}}
{{- toYaml (dict "params" $params "deploy" $deploy) -}}
{{- end -}}

{{/*
The chart's copy of the repository's constitutions/ folder (files/constitutions), as a YAML map of
path below constitutions/ -> ConfigMap key. ConfigMap keys cannot hold "/", so it becomes "__".
*/}}
{{- define "cai-platform.constitutionKeys" -}}
{{- $keys := dict -}}
{{- range $path, $_ := .Files.Glob "files/constitutions/**" -}}
{{- $relative := trimPrefix "files/constitutions/" $path -}}
{{- $key := replace "/" "__" $relative -}}
{{- if has $key (values $keys) -}}
{{- fail (printf "files/constitutions/%s maps to ConfigMap key %s, which another file already uses" $relative $key) -}}
{{- end -}}
{{- $_ := set $keys $relative $key -}}
{{- end -}}
{{- toYaml $keys -}}
{{- end -}}

{{/* Pod-level security: a fixed non-root user, the runtime's default seccomp profile. */}}
{{- define "cai-platform.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cai-platform.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The S3 key pair from its Secret, as the AWS SDKs (boto3 in cai and in MLflow) read it. */}}
{{- define "cai-platform.s3CredentialsEnv" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "cai-platform.s3SecretName" . }}
      key: {{ .Values.s3.credentialsSecret.accessKeyKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cai-platform.s3SecretName" . }}
      key: {{ .Values.s3.credentialsSecret.secretKeyKey }}
{{- end -}}

{{/* The MLflow client's credentials, as optional keys (a server without auth needs none). */}}
{{- define "cai-platform.mlflowCredentialsEnv" -}}
{{- range $key, $variable := .Values.mlflow.credentialsSecret.keys }}
- name: {{ $variable }}
  valueFrom:
    secretKeyRef:
      name: {{ include "cai-platform.mlflowSecretName" $ }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end -}}

{{/*
The retrain pod: an optional git clone, then `cai retrain` on the checkout (or, with no
retrain.gitRepo.url, on the chart's constitutions, mounted from the config ConfigMap at /etc/cai;
that directory has no commit, so the chart version is recorded as its revision).
*/}}
{{- define "cai-platform.retrainPodSpec" -}}
{{- $cpuImage := include "cai-platform.image" (dict "image" .Values.images.cpu "root" .) -}}
{{- $repo := ternary "/workspace/repo" "/etc/cai" (ne .Values.retrain.gitRepo.url "") -}}
serviceAccountName: {{ include "cai-platform.serviceAccountName" . }}
restartPolicy: Never
securityContext:
  {{- include "cai-platform.podSecurityContext" . | nindent 2 }}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- if .Values.retrain.gitRepo.url }}
initContainers:
  - name: clone
    image: {{ $cpuImage }}
    imagePullPolicy: {{ .Values.images.pullPolicy }}
    command: ["git", "clone", "--depth", "1", "--branch", "$(GIT_REVISION)", "--", "$(GIT_URL)", "/workspace/repo"]
    env:
      - name: GIT_URL
        value: {{ .Values.retrain.gitRepo.url | quote }}
      - name: GIT_REVISION
        value: {{ .Values.retrain.gitRepo.revision | quote }}
      - name: HOME
        value: /tmp
    securityContext:
      {{- include "cai-platform.containerSecurityContext" . | nindent 6 }}
    resources:
      {{- toYaml .Values.retrain.resources | nindent 6 }}
    volumeMounts:
      - name: workspace
        mountPath: /workspace
      - name: tmp
        mountPath: /tmp
{{- end }}
containers:
  - name: retrain
    image: {{ $cpuImage }}
    imagePullPolicy: {{ .Values.images.pullPolicy }}
    args:
      - retrain
      - --repo
      - {{ $repo }}
      {{- if not .Values.retrain.gitRepo.url }}
      - --revision
      - {{ printf "helm %s %s-%s" .Release.Name .Chart.Name .Chart.Version | quote }}
      {{- end }}
      - --host
      - {{ .Values.kfp.host | quote }}
      - --experiment
      - {{ .Values.kfp.experiment | quote }}
      {{- if .Values.kfp.multiUser }}
      - --namespace
      - {{ .Release.Namespace | quote }}
      {{- end }}
      - --config
      - /etc/cai/run-config.yaml
      - --registry
      - {{ include "cai-platform.s3Uri" (dict "root" . "prefix" .Values.s3.prefixes.constitutions) | quote }}
      {{- range .Values.retrain.constitutions }}
      - --constitution
      - {{ . | quote }}
      {{- end }}
      {{- if .Values.retrain.dryRun }}
      - --dry-run
      {{- end }}
    envFrom:
      - configMapRef:
          name: {{ include "cai-platform.envName" . }}
    env:
      {{- include "cai-platform.s3CredentialsEnv" . | nindent 6 }}
      {{- include "cai-platform.mlflowCredentialsEnv" . | trim | nindent 6 }}
      - name: CAI_IMAGE_CPU
        value: {{ $cpuImage | quote }}
      - name: CAI_IMAGE_GPU
        value: {{ include "cai-platform.image" (dict "image" .Values.images.gpu "root" .) | quote }}
      - name: HOME
        value: /tmp
    securityContext:
      {{- include "cai-platform.containerSecurityContext" . | nindent 6 }}
    resources:
      {{- toYaml .Values.retrain.resources | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/cai
        readOnly: true
      - name: kfp-token
        mountPath: /var/run/secrets/kubeflow/pipelines
        readOnly: true
      - name: tmp
        mountPath: /tmp
      {{- if .Values.retrain.gitRepo.url }}
      - name: workspace
        mountPath: /workspace
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "cai-platform.configName" . }}
      items:
        - key: run-config.yaml
          path: run-config.yaml
        {{- range $path, $key := include "cai-platform.constitutionKeys" . | fromYaml }}
        - key: {{ $key }}
          path: constitutions/{{ $path }}
        {{- end }}
  # Multi-user Kubeflow Pipelines authenticates in-cluster clients by a ServiceAccount token with
  # this audience; kfp.Client reads it from this path.
  - name: kfp-token
    projected:
      sources:
        - serviceAccountToken:
            audience: pipelines.kubeflow.org
            expirationSeconds: 7200
            path: token
  - name: tmp
    emptyDir: {}
  {{- if .Values.retrain.gitRepo.url }}
  - name: workspace
    emptyDir: {}
  {{- end }}
{{- end -}}
