"""The data layer: raw images fetched and verified, prepared into arrays, class splits and
fixed episodes, and the task sampler. Imports only the shared base (``mamlops.config``,
``errors``, ``files``, ``datasets``, ``urls``).
"""
