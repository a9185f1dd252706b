"""Tools around the six technique files: sampling and steering (generate), speed (bench), the paper's tables at our
scale (experiments), the gradient-range figure (grad_histogram). Run as scripts: python tools/NAME.py ..."""
