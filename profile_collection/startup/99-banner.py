print(f"calbench: lab '{cfg.name}', IOC prefix {cfg.pv_prefix}, results in {cfg.results_dir}")
print("  runs: cat[-1], cat[uid], cat.search(Key('plan_name') == 'scan')   (from tiled.queries import Key)")
if "RM" in globals():
    print("  queue: RM.status(), RM.item_add(BPlan('count', ['dmm'])), RM.queue_start()   "
          "(or `qserver` in a shell)")
