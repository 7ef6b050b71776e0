print(f"calbench: lab '{cfg.name}', IOC prefix {cfg.pv_prefix}, results in {cfg.results_dir}")
print(f"  RE.md: operator {RE.md.get('operator')!r}, proposal {RE.md.get('proposal')!r} "
      "(change with RE.md['operator'] = ...)")
print("  runs: cat.search(Key('plan_name') == 'calibrate_sink'), cat[uid], cat[-1]  (db is cat)")
if "RM" in globals():
    print("  queue: RM.status(), RM.item_add(BPlan('count', ['dmm'])), RM.queue_start()   "
          "(or `qserver` in a shell)")
