"""The core: what every layer shares and nothing above it changes. Config machinery, errors,
records, names, the artifact store, datasets and stage outputs, constitutions, prompts, MLflow
runs and registered versions as read. Imports nothing else of `cai_lib`."""
