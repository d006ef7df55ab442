"""Views of pods and nodes, placement profiles and the pod skeleton both kinds build on (pure)."""
