"""Speed and fidelity: `vitc bench`, the fidelity metrics, `vitc eval` over an image folder."""
