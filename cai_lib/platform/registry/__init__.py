"""The MLflow model registry as the platform writes it: versions registered once with lineage,
the promotion gate, the promotion lock, promotions; and where to find the registry (`lookup`)."""
