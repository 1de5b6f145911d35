"""Critical-neuron path graphs (networkx), built on attrib."""
