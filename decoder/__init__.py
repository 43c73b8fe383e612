"""rheo decoder: the decoder process (``decoder.service``): x0 latents → Stream-VAE → CFR → H.264.

See docs/decoder.md.
"""
