{{/*
Names, labels and the RBAC rules shared by the operator's templates.
*/}}

{{/* Chart name, or nameOverride. */}}
{{- define "lathe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of object names: fullnameOverride, else <release>-<name> (63 characters at most). */}}
{{- define "lathe.fullname" -}}
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

{{/*
Name of the metrics Service. A Service name is an RFC 1035 label: at most 63 characters, so the
prefix is cut to leave room for "-metrics", and a letter first, which a release name such as
"2024-lathe" does not give; the API server would reject that Service only at install time.
*/}}
{{- define "lathe.metricsServiceName" -}}
{{- $name := printf "%s-metrics" (include "lathe.fullname" . | trunc 55 | trimSuffix "-") }}
{{- if not (regexMatch "^[a-z]" $name) }}
{{- fail (printf "The metrics Service name %q starts with a digit, which Kubernetes rejects for a Service: set fullnameOverride to a name that starts with a letter, such as lathe-%s, or set metrics.enabled=false to create no metrics Service." $name .Release.Name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
Seconds in a Prometheus duration such as 30s, 1500ms or 1m30s (units y, w, d, h, m, s, ms; a
year is 365 days), which values.schema.json has checked.
*/}}
{{- define "lathe.durationSeconds" -}}
{{- $units := dict "y" 31536000.0 "w" 604800.0 "d" 86400.0 "h" 3600.0 "m" 60.0 "s" 1.0 "ms" 0.001 }}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(ms|[ywdhms])" . -1 }}
{{- $total = addf $total (mulf (regexFind "^[0-9]+" .) (get $units (regexReplaceAll "^[0-9]+" . ""))) }}
{{- end }}
{{- $total }}
{{- end }}

{{- define "lathe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lathe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lathe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lathe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lathe
{{- end }}

{{- define "lathe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lathe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name an existing ServiceAccount in the release namespace." .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "lathe.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The claim named in a pvc:// artifact root, or "" for any other scheme. */}}
{{- define "lathe.artifactClaim" -}}
{{- $root := .Values.operator.artifactRoot }}
{{- if hasPrefix "pvc://" $root }}
{{- index (splitList "/" (trimPrefix "pvc://" $root)) 0 }}
{{- end }}
{{- end }}

{{/* The claim the operator mounts (artifacts.mount), or fails with what to set. */}}
{{- define "lathe.mountClaim" -}}
{{- $claim := default (include "lathe.artifactClaim" .) .Values.artifacts.mount.claimName }}
{{- if not $claim }}
{{- fail (printf "artifacts.mount.enabled is true, but artifacts.mount.claimName is empty and operator.artifactRoot %q names no claim: set artifacts.mount.claimName, or use a pvc://<claim>/<path> artifact root." .Values.operator.artifactRoot) }}
{{- end }}
{{- $claim }}
{{- end }}

{{/*
Cross-field checks that values.schema.json cannot state with a clear message. Every template
that depends on the mode includes this, so a bad combination fails the install.
*/}}
{{- define "lathe.validate" -}}
{{- if and (eq .Values.mode "namespaced") (not .Values.watchNamespaces) }}
{{- fail "mode is \"namespaced\" but watchNamespaces is empty: list the namespaces the operator watches, for example --set 'watchNamespaces={team-a,team-b}', or set mode=clusterWide." }}
{{- end }}
{{- if and (eq .Values.mode "clusterWide") .Values.watchNamespaces }}
{{- fail (printf "watchNamespaces is %v but mode is \"clusterWide\", which watches every namespace: set mode=namespaced to watch only those namespaces, or empty watchNamespaces." .Values.watchNamespaces) }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.healthPort)) }}
{{- fail (printf "metrics.port and healthPort are both %v, but the metrics server and kopf's liveness endpoint each need a port of their own: set one of them to another port (defaults 8080 and 8081)." .Values.metrics.port) }}
{{- end }}
{{- $election := .Values.leaderElection }}
{{- if and (gt (int .Values.replicaCount) 1) (not $election.enabled) }}
{{- fail (printf "replicaCount is %v but leaderElection.enabled is false, so every pod would reconcile every resource: set leaderElection.enabled=true, or replicaCount=1." .Values.replicaCount) }}
{{- end }}
{{- if $election.enabled }}
{{- if lt (int $election.leaseDuration) (add (int $election.renewDeadline) (int $election.retryPeriod)) }}
{{- fail (printf "leaderElection.leaseDuration (%v) must be at least leaderElection.renewDeadline (%v) plus leaderElection.retryPeriod (%v), so that a leader stops before another pod takes the Lease: raise leaseDuration or lower renewDeadline (defaults 15, 10 and 2)." $election.leaseDuration $election.renewDeadline $election.retryPeriod) }}
{{- end }}
{{- if not (gt (float64 $election.renewDeadline) (mulf $election.retryPeriod 1.2)) }}
{{- fail (printf "leaderElection.renewDeadline (%v) must exceed 1.2 times leaderElection.retryPeriod (%v), so that the leader gets more than one try to renew: raise renewDeadline or lower retryPeriod (defaults 10 and 2)." $election.renewDeadline $election.retryPeriod) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The five lathe.dev kinds as Kind=plural pairs. tests/chart/test_chart.py checks this list against
the API models in operator/lathe/api.
*/}}
{{- define "lathe.kinds" -}}
Corpus=corpora Tokenizer=tokenizers PretrainJob=pretrainjobs FineTune=finetunes ModelDeployment=modeldeployments
{{- end }}

{{/* The plural names of the five kinds, space-separated. */}}
{{- define "lathe.plurals" -}}
{{- $plurals := list }}
{{- range splitList " " (include "lathe.kinds" .) }}
{{- $plurals = append $plurals (index (splitList "=" .) 1) }}
{{- end }}
{{- join " " $plurals }}
{{- end }}

{{/*
The Argo CD health checks shipped in the chart's argocd/ folder, as a dict of Kind to Lua text.
A check is argocd/lathe.dev_<Kind>.lua (the argocd-cm key suffix), argocd/<Kind>.lua, or
argocd/lathe.dev/<Kind>/health.lua as in Argo CD's own repository; the kind is matched
case-insensitively, or by its plural. The dict is empty when there are none.
*/}}
{{- define "lathe.argocdHealthChecks" -}}
{{- $checks := dict }}
{{- range $path, $_ := .Files.Glob "argocd/**.lua" }}
{{- $file := base $path }}
{{- $name := lower (trimPrefix "lathe.dev_" (trimSuffix ".lua" $file)) }}
{{- if eq $file "health.lua" }}
{{- $name = lower (base (dir $path)) }}
{{- end }}
{{- range splitList " " (include "lathe.kinds" $) }}
{{- $pair := splitList "=" . }}
{{- if or (eq $name (lower (index $pair 0))) (eq $name (index $pair 1)) }}
{{- $_ := set $checks (index $pair 0) ($.Files.Get $path) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $checks }}
{{- end }}

{{/*
RBAC rules for the namespaced objects the operator reads and writes: in a ClusterRole in
clusterWide mode, in a Role per watched namespace in namespaced mode. The rules grant exactly the
calls of operator/lathe/k8s and of kopf; tests/chart/test_chart.py keeps a table of those calls
and fails when a rule grants more or less.
*/}}
{{- define "lathe.namespacedRules" -}}
{{- $plurals := splitList " " (include "lathe.plurals" .) }}
# kopf lists and watches the five kinds and patches them (finalizers of the progress timers);
# the operator reads a resource's inputs and a Job's owner.
- apiGroups: ["lathe.dev"]
  resources:
{{- range $plurals }}
    - {{ . }}
{{- end }}
  verbs: ["get", "list", "watch", "patch"]
# Status is written through the status subresource, by kopf and by the Job event handler.
- apiGroups: ["lathe.dev"]
  resources:
{{- range $plurals }}
    - {{ printf "%s/status" . }}
{{- end }}
  verbs: ["patch"]
# Owned objects carry blockOwnerDeletion: true, which the OwnerReferencesPermissionEnforcement
# admission plugin allows only to those who may update the owner's finalizers.
- apiGroups: ["lathe.dev"]
  resources:
{{- range $plurals }}
    - {{ printf "%s/finalizers" . }}
{{- end }}
  verbs: ["update"]
# Training and export Jobs: created, read, suspended or resumed, deleted after a failed attempt,
# and watched by kopf.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# The pods of a Job are listed to read exit codes and rank 0's termination message.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# The stage config of each attempt, deleted with the attempt's Job.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "delete"]
# Headless Services of distributed training are created, and deleted with the attempt's Job;
# Triton Services are server-side applied, which needs create and patch, and watched by kopf,
# so a deleted one is created again.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "list", "watch", "patch", "delete"]
# Triton Deployments are server-side applied, read for their ready replicas, and watched by kopf,
# so that Ready follows the pods and a deleted Deployment is created again.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["create", "get", "list", "watch", "patch"]
# Triton HPAs are server-side applied while autoscaling is on, and deleted when it is turned off.
# kopf watches them, so that a deleted or edited HPA is applied again.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["create", "list", "watch", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["create", "patch"]
# kopf posts Kubernetes events about the resources it handles (core v1 events), and the
# operator lists a Job's events for the FailedCreate reason of pods that were never created.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end }}

{{/*
Cluster-scoped rules. The operator reads the PodMonitor CRD, in both modes, to decide whether to
create PodMonitors. In clusterWide mode kopf also lists and watches CRDs to discover the
resources it serves. In namespaced mode the operator turns kopf's scanning off
(LATHE_WATCH_NAMESPACES), and kopf reads only the API discovery endpoints, which need no rule.
*/}}
{{- define "lathe.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  resourceNames: ["podmonitors.monitoring.coreos.com"]
  verbs: ["get"]
{{- if eq .Values.mode "clusterWide" }}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
