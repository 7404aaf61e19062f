"""The run's protocol as pure state machines (sans-IO): no Ray, no sockets, no clocks of their own.

- ``server.ServerProtocol``: a server process -- primary of a shard, holder of
  its peers' replicas (with a fence per replica), or a warm spare;
- ``exchange.ExchangeProtocol``: a worker's calls to the shards, rerouted and
  resent until answered, with the worker's ledger of acknowledged pushes;
- ``supervisor.SupervisorProtocol``: probes, a pure ``decide()`` over a durable
  registry, recoveries, re-replication, worker (re)starts.

Each takes a request, reply, failure or timer and returns effects
(``messages``). Two hosts carry them out: the Ray actors in ``actors/`` and
the deterministic simulator in ``sim/``, which explores them under crashes,
node loss, false suspicion and supervisor restarts with an independent
checker. A line of protocol logic outside this package is a line the
simulator cannot explore.
"""
