"""Experiments and device checks: the top floor of the package.

Modules here may import anything below them (models, objectives, data, training, capacity, kernels);
nothing below imports them. Each experiment is driven by a thin tool in tools/.
"""
