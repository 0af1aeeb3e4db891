"""The meta-learning core: the network, MAML and its MAML++ switches, the training loop and
its checkpoints, and the evaluation on fixed episodes. Imports the data layer and the base.
"""
