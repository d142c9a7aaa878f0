L='import time,statistics
xs=[]
for _ in range(30):
    t=time.perf_counter(); sum(range(100000)); xs.append((time.perf_counter()-t)*1e3)
print("%.3f %.3f" % (statistics.median(xs), min(xs)))'
for rep in 1 2; do
  for c in $(seq 0 15); do echo "rep$rep cpu$c $(taskset -c $c python3 -c "$L")"; done
  for u in 1 2 3; do echo "rep$rep unpinned $(python3 -c "$L")"; done
done
