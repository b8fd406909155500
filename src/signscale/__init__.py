"""signscale: traffic-sign recognition from a laptop to a GPU cluster.

The pipeline, in the order data flows: ``sources`` -> ``pack`` (shards on any ``storage`` URL)
-> ``stream`` (exactly-once loader) -> ``models`` -> ``train`` -> ``evaluate`` / ``reports``.
"""

__version__ = "0.1.0"
