"""Performance measurements (not tests): each script prints ratios measured side by side in one run.

OpenMP threads sleep instead of spin-waiting (OMP_WAIT_POLICY=PASSIVE, unless the environment sets
it): with torch's default spinning, any other busy process on a 2-core machine makes a 2-thread
torch step 7-400x slower (a ResNet56 step 8.7 s instead of 1.2 s, an MLP step 268 ms instead of
0.8 ms), which buries every difference a benchmark is after. It must be set before torch loads.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
