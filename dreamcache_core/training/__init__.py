"""Training the adapters: data (manifests, shards, the dataset builder, synthesis), the loss, the loop,
and the `train` command."""
