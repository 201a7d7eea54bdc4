"""Protobuf messages <-> plain Python values, one module per service contract.

These modules (and the servicers that register generated stubs) are the only importers of the
code `make proto` generates under `gen/`; everything else sees frozen dataclasses.
"""
