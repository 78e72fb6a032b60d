"""The local backend of `lathe run`: stages as local processes, Triton from the pytriton wheel."""
