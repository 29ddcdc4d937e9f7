"""The reference model zoo: small causal LMs that lwq builds and ships itself."""

from lwq.zoo.build import DEFAULT_OUT, ZOO_SPECS, ZooModelCard, ZooModelSpec, build_zoo

__all__ = ["DEFAULT_OUT", "ZOO_SPECS", "ZooModelCard", "ZooModelSpec", "build_zoo"]
