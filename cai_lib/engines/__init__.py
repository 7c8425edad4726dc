"""The engines: how models run. Generation backends (transformers, vLLM) behind one interface,
model references and loading, training launchers (one process, torchrun, a Kubeflow TrainJob).
Imports only the core; knows no stage of the method."""
