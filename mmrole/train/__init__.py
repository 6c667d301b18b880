"""Training core without Ray or DeepSpeed: typed job configs, LR schedules, the DeepSpeed config builder,
checkpoint commit/rotation rules, metrics, the Arrow row format of encoded samples and the reward-model data
builder. The Ray/DeepSpeed shell around it lives in :mod:`mmrole.ray_train` and :mod:`mmrole.ray_data_ingest`."""
