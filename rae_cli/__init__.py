"""rae: Diffusion Transformers with Representation Autoencoders (arXiv 2510.11690), as a toolkit.

The library is the product; ``rae_cli.cli`` only translates command lines into library calls.
"""

__version__ = "0.1.0"
