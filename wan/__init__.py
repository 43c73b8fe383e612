"""rheo wan: helpers of the Wan2.1 model family that several services share (architecture configs, device/dtype,
the flow-matching scheduler and noise draws, the tiny random models). No service code; see wan/README.md.

Modules are imported directly (``from wan.scheduler import first_timestep``); this package init stays empty.
"""
