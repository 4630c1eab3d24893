"""Everything that trains: data, model, training loop, metrics, the objectives."""
