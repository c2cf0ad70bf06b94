"""A second agent that recovers what a killed one left open.

    recover_agent.py DB URI DOMAIN POLICY   # prints the recover document
"""

import json
import sys

import ckptstore

db, uri, domain, policy = sys.argv[1:5]
print(json.dumps(ckptstore.Store(db, connect=uri).recover(domain, policy=policy)))
