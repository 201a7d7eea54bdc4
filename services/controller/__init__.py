"""The controller: forms the cluster's membership, hosts the torch.distributed rendezvous
store and hands each decode step's micro-batch plan to every instance. It never sees a tensor."""
