# plot_kv_speedup.gp - draws the KV-cache experiment of bench_model as a PNG.
#
# Input: the table bench_model --plot-data FILE writes, one line per run:
#   new_tokens seconds_with_kv_cache seconds_without speedup
# Usage: gnuplot -e "data='kv.dat'; out='docs/kv_speedup.png'" bench/plot_kv_speedup.gp
# Time is on a log scale: without a cache it grows with the square of the length
# (every step recomputes the whole sequence), with the cache linearly.
if (!exists("data")) data = 'kv_speedup.dat'
if (!exists("out")) out = 'docs/kv_speedup.png'
if (!exists("subtitle")) subtitle = 'qwen2.5-0.5b preset (bf16 weights, f16 KV), 2 threads, 8-token prompt'

set terminal pngcairo size 900,560 font 'DejaVu Sans,11' noenhanced
set output out
set title "Time to generate N tokens: paged KV cache vs full recompute\n".subtitle
set xlabel 'new tokens generated (N)'
set ylabel 'wall time (s), log scale'
set logscale y
set grid ytics mytics
set key top left
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set yrange [0.1:*]
set offsets 0, 0, 0, 0
plot data using 2:xtic(1) title 'with KV cache' lc rgb '#2a7ab9', \
     ''   using 3 title 'without cache (recompute every step)' lc rgb '#d9534f', \
     ''   using 0:($3*1.35):(sprintf('%.1fx', $4)) with labels offset 1.6,0 notitle
