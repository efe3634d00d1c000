"""The cluster relay and registry: stateless replicas over NATS JetStream.

``agt-mesh relay --nats nats://host:4222[,...]`` runs a relay and/or registry replica that
speaks exactly the AgentMesh (AGT 5.0.0) relay and registry protocol — the wire front ends
are the development servers' (:mod:`agt_mesh.dev`) — but keeps no state of its own:

* every routed frame is published to a replicated JetStream stream under a subject per
  recipient, and stays there until the recipient acknowledges it (or 72 h pass); the
  replica a recipient is connected to reads that subject with an ordered consumer, so
  live routing between replicas and the offline store are one mechanism, and a frame
  accepted by any replica survives the death of that replica (and, with three NATS
  nodes and R3 streams, of one NATS node);
* which connection currently owns a DID is a JetStream KV entry; every replica watches
  the bucket, so the newer connection wins across replicas too (4006 to the older);
* registry records live in a JetStream KV bucket and every change is a compare-and-set,
  so a one-time pre-key is handed out once across all replicas.

Needs the ``cluster`` extra (``nats-py``) and a NATS server with JetStream.
"""

from agt_mesh.cluster.registry import ClusterRegistry, KvBackend
from agt_mesh.cluster.relay import ClusterRelay

__all__ = ["ClusterRegistry", "ClusterRelay", "KvBackend"]
