"""ACME's product classifier, a stand-in: 12x12 grey images of three part shapes (bar, ring,
cross), made here from a seed — no download. An example of an app's own edgeci task."""
