"""How many experts each layer gets: Eq. 10 with exact rounding, the neuron-guided, uniform and
random strategies, and which layers get a routing classifier."""
