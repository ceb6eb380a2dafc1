"""The profile's defaults, written once (torch-free: the command line's options read them too)."""

PROFILE_TOKENS = 100_000  # tokens sampled per language (the paper's Q, METHOD.md sec. 1)
PROFILE_BATCH_TOKENS = 8192  # tokens per forward batch
NEURON_TOP_N = 1000  # NeuronMoE: the authors' code keeps each language's 1,000 best neurons
NEURON_DOCUMENTS = 500  # ... ranked on 500 documents per language (the authors' sense data)
