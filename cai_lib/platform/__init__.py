"""The platform around the method: the run config that composes every stage's settings, the
pre-flight checks, the model registry and its promotion gate, GitOps retraining, serving and the
webhook receiver, the KFP API client. Imports the method, the engines and the core."""
