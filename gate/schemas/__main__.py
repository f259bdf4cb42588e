"""`python -m gate.schemas` rewrites gate/schemas/*.schema.json from the pydantic models."""

from gate.schemas import write_all

for path in write_all():
    print(path)
