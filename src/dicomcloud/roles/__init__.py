"""The four roles; the only modules that import pynetdicom or starlette."""
