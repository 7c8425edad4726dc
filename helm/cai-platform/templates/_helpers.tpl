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
{{- default (printf "%s-retrain" (include "cai-platform.fullname" .)) .Values.serviceAccount.name -}}
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

{{- define "cai-platform.s3ReadOnlySecretName" -}}
{{- required "s3.readOnlyCredentialsSecret.name is required: the name of an existing Secret with a read-only S3 access key pair" .Values.s3.readOnlyCredentialsSecret.name -}}
{{- end -}}

{{/* The registered (production) model names of serving.models: <prefix>-<constitution>-<role>, as a YAML list. */}}
{{- define "cai-platform.servedModels" -}}
{{- $prefix := default "cai" .Values.pipeline.params.model_name_prefix -}}
{{- $names := list -}}
{{- range .Values.serving.models -}}
{{- $names = append $names (printf "%s-%s-%s" $prefix .constitution .role) -}}
{{- end -}}
{{- toYaml $names -}}
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
  "promoter_secret" .Values.mlflow.promoterSecret.name
  "promoter_keys" (dict .Values.mlflow.promoterSecret.usernameKey "CAI_PROMOTER_TRACKING_USERNAME" .Values.mlflow.promoterSecret.passwordKey "CAI_PROMOTER_TRACKING_PASSWORD")
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

{{/* The read-write S3 key pair from its Secret, as the AWS SDKs (boto3 in cai and in MLflow) read it. */}}
{{- define "cai-platform.s3CredentialsEnv" -}}
{{- include "cai-platform.s3KeyPairEnv" (dict "name" (include "cai-platform.s3SecretName" .) "secret" .Values.s3.credentialsSecret) -}}
{{- end -}}

{{/* The read-only S3 key pair: for pods that only read (serving, the webhook receiver). */}}
{{- define "cai-platform.s3ReadOnlyCredentialsEnv" -}}
{{- include "cai-platform.s3KeyPairEnv" (dict "name" (include "cai-platform.s3ReadOnlySecretName" .) "secret" .Values.s3.readOnlyCredentialsSecret) -}}
{{- end -}}

{{- define "cai-platform.s3KeyPairEnv" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .secret.accessKeyKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .secret.secretKeyKey }}
{{- end -}}

{{/*
One MLflow account's Secret as environment variables, optional keys; call with (dict "secret"
.Values.mlflow.servingSecret "prefix" "MLFLOW_TRACKING"), which sets MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD.
*/}}
{{/* The key of mlflow.credentialsSecret.keys that becomes `variable`; call with (dict "keys" ... "variable" ...). */}}
{{- define "cai-platform.keyOf" -}}
{{- $found := "" -}}
{{- range $key, $variable := .keys -}}
{{- if eq $variable $.variable -}}
{{- $found = $key -}}
{{- end -}}
{{- end -}}
{{- required (printf "mlflow.credentialsSecret.keys must map a key to %s: the setup hook reads the pipeline's account from it" .variable) $found -}}
{{- end -}}

{{- define "cai-platform.mlflowAccountEnv" -}}
- name: {{ .prefix }}_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .secret.name }}
      key: {{ .secret.usernameKey }}
      optional: true
- name: {{ .prefix }}_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secret.name }}
      key: {{ .secret.passwordKey }}
      optional: true
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
      # `cai retrain` only reads the registry: the read-only account
      {{- include "cai-platform.mlflowAccountEnv" (dict "secret" .Values.mlflow.servingSecret "prefix" "MLFLOW_TRACKING") | nindent 6 }}
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

{{/*
An egress rule to the endpoint at .url: an in-cluster Service (<service>.<namespace>.svc[...], or
a bare <service> of the release namespace) by its namespace on .ports (default: the URL's port);
any other host by .cidrs, or without them at any address outside the private ranges, on those
ports. Call with (dict "root" $ "url" ... "cidrs" list "ports" list).
*/}}
{{- define "cai-platform.egressToUrl" -}}
{{- $url := urlParse .url -}}
{{- $hostPort := splitList ":" $url.host -}}
{{- $hostname := first $hostPort -}}
{{- $port := ternary (last $hostPort) (ternary "443" "80" (eq $url.scheme "https")) (eq (len $hostPort) 2) -}}
{{- $ports := .ports | default (list (int $port)) -}}
{{- $labels := splitList "." $hostname -}}
{{- $namespace := "" -}}
{{- if eq (len $labels) 1 -}}
{{- $namespace = .root.Release.Namespace -}}
{{- else if and (ge (len $labels) 3) (eq (index $labels 2) "svc") -}}
{{- $namespace = index $labels 1 -}}
{{- end -}}
- to:
  {{- if $namespace }}
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $namespace }}
  {{- else if .cidrs }}
  {{- range .cidrs }}
    - ipBlock:
        cidr: {{ . }}
  {{- end }}
  {{- else }}
    - ipBlock:
        cidr: 0.0.0.0/0
        except: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]
  {{- end }}
  ports:
  {{- range $ports }}
    - port: {{ . }}
      protocol: TCP
  {{- end }}
{{- end -}}

{{/*
The egress rules of the platform's pods: DNS, S3, MLflow, the extra CIDRs, and as asked the
Kubeflow Pipelines API (.kfp), the Kubernetes API (.kubernetes), the git host of
retrain.gitRepo.url (.git) and pods like themselves (.peers, a podSelector). Call with
(dict "root" $ "kfp" bool "kubernetes" bool "git" bool "peers" dict).
*/}}
{{- define "cai-platform.egressRules" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- $egress := $values.egress -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{ include "cai-platform.egressToUrl" (dict "root" $root "url" (include "cai-platform.s3EndpointUrl" $root) "cidrs" $egress.s3Cidrs "ports" list) }}
{{- if $values.mlflow.server.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "cai-platform.selectorLabels" $root | nindent 10 }}
          app.kubernetes.io/component: mlflow
  ports:
    - port: {{ $values.mlflow.server.port }}
      protocol: TCP
{{- else }}
{{ include "cai-platform.egressToUrl" (dict "root" $root "url" $values.mlflow.trackingUri "cidrs" list "ports" list) }}
{{- end }}
{{- if .kfp }}
{{ include "cai-platform.egressToUrl" (dict "root" $root "url" $values.kfp.host "cidrs" list "ports" $egress.kfpPorts) }}
{{- end }}
{{- if .kubernetes }}
{{- $cidrs := $egress.kubernetesApiCidrs }}
{{- if not $cidrs }}
{{- range (lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes").endpoints }}
{{- range .addresses }}
{{- $cidrs = append $cidrs (printf "%s/32" .) }}
{{- end }}
{{- end }}
{{- end }}
- to:
    {{- range ($cidrs | default (list "0.0.0.0/0")) }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    {{- range $egress.kubernetesApiPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- if and .git $values.retrain.gitRepo.url }}
{{ include "cai-platform.egressToUrl" (dict "root" $root "url" $values.retrain.gitRepo.url "cidrs" list "ports" list) }}
{{- end }}
{{- range $egress.extraCidrs }}
- to:
    - ipBlock:
        cidr: {{ .cidr }}
  {{- with .ports }}
  ports:
    {{- range . }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- end }}
{{- end }}
{{- with .peers }}
- to:
    - podSelector:
        {{- toYaml . | nindent 8 }}
{{- end }}
{{- end -}}
