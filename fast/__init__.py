"""Fast paths of the training loop: optimisations, each tested equal to the reference in mlstm.py."""
